//! The admin console: first-admin setup, login (rate limited, Argon2id), the application
//! queue with filters and bulk decisions, grants and tokens, model settings with download
//! statistics, and the audit log. Every POST carries the session's CSRF token.

use std::collections::BTreeMap;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use serde_json::{Value, json};

use super::pages::html;
use crate::State;
use crate::applications;
use crate::audit::{self, Event};
use crate::auth::session::{self, COOKIE, WebSession};
use crate::db::models::access::{
    self as people, APPROVED, PENDING, REJECTED, UNVERIFIED, WITHDRAWN,
};
use crate::db::models::audit as audit_rows;
use crate::db::models::catalog::{self, Model, ModelSettings, QUESTION_KINDS, Question};
use crate::db::models::tokens as token_rows;
use crate::error::{Error, Result};
use crate::{paths, util};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin", web::get().to(home))
        .route("/admin/setup", web::get().to(setup_page))
        .route("/admin/setup", web::post().to(setup_submit))
        .route("/admin/login", web::get().to(login_page))
        .route("/admin/login", web::post().to(login_submit))
        .route("/admin/logout", web::post().to(logout))
        .route("/admin/applications", web::get().to(queue))
        .route("/admin/applications/decide", web::post().to(decide))
        .route("/admin/applications.csv", web::get().to(applications_csv))
        .route("/admin/grants", web::get().to(grants))
        .route("/admin/grants/{id}/expiry", web::post().to(grant_expiry))
        .route("/admin/grants/{id}/revoke", web::post().to(grant_revoke))
        .route("/admin/tokens/{jti}/revoke", web::post().to(token_revoke))
        .route("/admin/models", web::get().to(models))
        .route("/admin/models/{org}/{name}", web::get().to(model_page))
        .route("/admin/models/{org}/{name}", web::post().to(model_save))
        .route("/admin/audit", web::get().to(audit_page))
        .route("/admin/audit.csv", web::get().to(audit_csv));
}

type Fields = Vec<(String, String)>;

fn field<'a>(f: &'a Fields, name: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to.to_string()))
        .finish()
}

fn cookie_value(req: &HttpRequest) -> Option<String> {
    let header = req.headers().get(header::COOKIE)?.to_str().ok()?;
    header.split(';').find_map(|c| {
        c.trim()
            .strip_prefix(&format!("{COOKIE}="))
            .map(str::to_string)
    })
}

fn set_cookie(state: &State, value: &str, max_age: i64) -> String {
    let secure = if state.settings.public_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}")
}

/// The logged-in administrator, or a redirect to the login page.
async fn session(
    req: &HttpRequest,
    state: &State,
) -> std::result::Result<WebSession, HttpResponse> {
    let Some(raw) = cookie_value(req) else {
        return Err(see_other("/admin/login"));
    };
    match session::lookup(&state.db, &raw).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(see_other("/admin/login")),
        Err(e) => Err(e.error_response_html()),
    }
}

/// The administrator behind a form POST, whose CSRF token must match the session's.
async fn posted(
    req: &HttpRequest,
    state: &State,
    form: &Fields,
) -> std::result::Result<WebSession, HttpResponse> {
    let s = session(req, state).await?;
    if !s.csrf_ok(field(form, "csrf")) {
        return Err(Error::forbidden("csrf", "This form is out of date or did not come from this site; reload the page and try again.").error_response_html());
    }
    Ok(s)
}

macro_rules! admin_or_return {
    ($e:expr) => {
        match $e {
            Ok(s) => s,
            Err(resp) => return Ok(resp),
        }
    };
}

async fn home() -> HttpResponse {
    see_other("/admin/applications")
}

#[derive(Template)]
#[template(path = "setup.html")]
struct SetupPage {
    code: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct CodeQuery {
    code: String,
}

async fn setup_page(q: web::Query<CodeQuery>) -> HttpResponse {
    html(
        StatusCode::OK,
        &SetupPage {
            code: q.into_inner().code,
            error: None,
        },
    )
}

async fn setup_submit(state: web::Data<State>, form: web::Form<Fields>) -> Result<HttpResponse> {
    let f = form.into_inner();
    let (code, email, pw) = (
        field(&f, "code").to_string(),
        field(&f, "email"),
        field(&f, "password"),
    );
    if pw != field(&f, "password2") {
        return Ok(html(
            StatusCode::BAD_REQUEST,
            &SetupPage {
                code,
                error: Some("The two passwords differ.".into()),
            },
        ));
    }
    match session::complete_setup(&state.db, &code, email, pw).await {
        Ok(()) => Ok(see_other("/admin/login")),
        Err(e) if e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::CONFLICT => {
            Ok(html(
                e.status,
                &SetupPage {
                    code,
                    error: Some(e.message),
                },
            ))
        }
        Err(e) => Ok(e.error_response_html()),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    email: String,
    error: Option<String>,
}

async fn login_page() -> HttpResponse {
    html(
        StatusCode::OK,
        &LoginPage {
            email: String::new(),
            error: None,
        },
    )
}

async fn login_submit(
    req: HttpRequest,
    state: web::Data<State>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let email = field(&f, "email").chars().take(254).collect::<String>();
    let ttl = util::parse_duration(&state.settings.admin.session_ttl)
        .unwrap_or(std::time::Duration::from_secs(43200));
    let ip = req.peer_addr().map(|a| a.ip());
    match session::login(
        &state.db,
        &state.logins,
        &email,
        field(&f, "password"),
        ip,
        ttl,
    )
    .await
    {
        Ok((raw, _)) => Ok(HttpResponse::SeeOther()
            .insert_header((header::LOCATION, "/admin/applications"))
            .insert_header((
                header::SET_COOKIE,
                set_cookie(&state, &raw, ttl.as_secs() as i64),
            ))
            .finish()),
        Err(e) if e.status.is_client_error() => Ok(html(
            e.status,
            &LoginPage {
                email,
                error: Some(e.message),
            },
        )),
        Err(e) => Ok(e.error_response_html()),
    }
}

async fn logout(
    req: HttpRequest,
    state: web::Data<State>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let _s = admin_or_return!(posted(&req, &state, &f).await);
    if let Some(raw) = cookie_value(&req) {
        session::logout(&state.db, &raw).await?;
    }
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/admin/login"))
        .insert_header((header::SET_COOKIE, set_cookie(&state, "", 0)))
        .finish())
}

// ---------------------------------------------------------------- the queue

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct QueueFilter {
    status: String,
    model: String,
    country: String,
    domain: String,
    since: String,
    q: String,
    sort: String,
    page: usize,
    notice: String,
}

struct Row {
    id: String,
    name: String,
    email: String,
    affiliation: String,
    model: String,
    country: String,
    intended_use: String,
    answers: Vec<(String, String)>,
    reason: Option<String>,
    created: String,
    status: String,
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    csrf: String,
    notice: Option<String>,
    f: QueueFilter,
    statuses: [&'static str; 6],
    models: Vec<String>,
    rows: Vec<Row>,
    total: usize,
    page: usize,
    pages: usize,
    prev: Option<String>,
    next: Option<String>,
    back: String,
}

const PAGE: usize = 50;

fn date(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn queue_url(f: &QueueFilter, page: usize) -> String {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, paths::SEGMENT).to_string();
    format!(
        "/admin/applications?status={}&model={}&country={}&domain={}&since={}&q={}&sort={}&page={page}",
        enc(&f.status),
        enc(&f.model),
        enc(&f.country),
        enc(&f.domain),
        enc(&f.since),
        enc(&f.q),
        enc(&f.sort)
    )
}

/// The applications a queue filter selects, sorted as it asks, and the models to choose from.
async fn filtered(
    state: &State,
    f: &mut QueueFilter,
) -> Result<(Vec<people::Application>, Vec<String>)> {
    if f.sort.is_empty() {
        f.sort = "oldest".into();
    }
    if !QUEUE_STATUSES.contains(&f.status.as_str()) {
        f.status = PENDING.into();
    }
    let (status, model) = (f.status.clone(), f.model.clone());
    let (apps, models) = state
        .db
        .read(move |c| {
            let st = (status != "all").then_some(status.as_str());
            let m = (!model.is_empty()).then_some(model.as_str());
            Ok((
                people::list_applications(c, st, m)?,
                catalog::list_models(c)?
                    .into_iter()
                    .map(|m| m.id)
                    .collect::<Vec<_>>(),
            ))
        })
        .await?;
    let since = chrono::NaiveDate::parse_from_str(&f.since, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp());
    let needle = f.q.trim().to_lowercase();
    let domain = f.domain.trim().trim_start_matches('@').to_lowercase();
    let country = f.country.trim().to_uppercase();
    let mut apps: Vec<_> = apps
        .into_iter()
        .filter(|a| country.is_empty() || a.country == country)
        .filter(|a| domain.is_empty() || a.email.rsplit_once('@').is_some_and(|(_, d)| d == domain))
        .filter(|a| since.is_none_or(|t| a.created_at >= t))
        .filter(|a| {
            needle.is_empty()
                || [
                    &a.name,
                    &a.email,
                    &a.affiliation,
                    &a.intended_use,
                    &a.answers,
                ]
                .iter()
                .any(|v| v.to_lowercase().contains(&needle))
        })
        .collect();
    match f.sort.as_str() {
        "newest" => apps.sort_by_key(|a| std::cmp::Reverse(a.created_at)),
        "name" => apps.sort_by_key(|a| a.name.to_lowercase()),
        "country" => apps.sort_by_key(|a| a.country.clone()),
        _ => apps.sort_by_key(|a| a.created_at),
    }
    Ok((apps, models))
}

const QUEUE_STATUSES: [&str; 6] = [PENDING, UNVERIFIED, APPROVED, REJECTED, WITHDRAWN, "all"];

async fn queue(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<QueueFilter>,
) -> Result<HttpResponse> {
    let s = admin_or_return!(session(&req, &state).await);
    let mut f = q.into_inner();
    let (apps, models) = filtered(&state, &mut f).await?;
    let statuses = QUEUE_STATUSES;
    let total = apps.len();
    let pages = total.div_ceil(PAGE).max(1);
    let page = f.page.clamp(1, pages);
    let rows = apps
        .into_iter()
        .skip((page - 1) * PAGE)
        .take(PAGE)
        .map(|a| {
            let answers = match serde_json::from_str::<Value>(&a.answers) {
                Ok(Value::Object(m)) => m
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string()),
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Row {
                id: a.id,
                name: a.name,
                email: a.email,
                affiliation: a.affiliation,
                model: a.model_id,
                country: a.country,
                intended_use: a.intended_use,
                answers,
                reason: a.reason,
                created: date(a.created_at),
                status: a.status,
            }
        })
        .collect();
    let notice = (!f.notice.is_empty()).then(|| f.notice.clone());
    let page_view = QueuePage {
        csrf: s.csrf,
        notice,
        prev: (page > 1).then(|| queue_url(&f, page - 1)),
        next: (page < pages).then(|| queue_url(&f, page + 1)),
        back: queue_url(&f, page),
        statuses,
        models,
        rows,
        total,
        page,
        pages,
        f,
    };
    Ok(html(StatusCode::OK, &page_view))
}

/// One or many approvals or rejections, from the queue's form.
async fn decide(
    req: HttpRequest,
    state: web::Data<State>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let s = admin_or_return!(posted(&req, &state, &f).await);
    let (action, ids): (&str, Vec<String>) = if !field(&f, "approve_one").is_empty() {
        ("approve", vec![field(&f, "approve_one").to_string()])
    } else if !field(&f, "reject_one").is_empty() {
        ("reject", vec![field(&f, "reject_one").to_string()])
    } else {
        (
            field(&f, "action"),
            f.iter()
                .filter(|(k, _)| k == "ids")
                .map(|(_, v)| v.clone())
                .collect(),
        )
    };
    let back = field(&f, "back");
    let back = if back.starts_with("/admin/applications") {
        back.to_string()
    } else {
        "/admin/applications".to_string()
    };
    if ids.is_empty() || ids.len() > 500 {
        return Ok(
            Error::bad_request("no_selection", "Select between 1 and 500 applications.")
                .error_response_html(),
        );
    }
    let expires = match field(&f, "expires") {
        "" => None,
        e => Some(util::parse_duration(e).map_err(|e| Error::invalid_field("expires", e))?),
    };
    let reason = field(&f, "reason").trim().to_string();
    if action == "reject" && reason.is_empty() {
        return Ok(Error::invalid_field(
            "reason",
            "a rejection needs a reason; it is shown to the researcher",
        )
        .error_response_html());
    }
    if action != "approve" && action != "reject" {
        return Ok(Error::invalid_field("action", "approve or reject").error_response_html());
    }
    let (ctx, actor, act) = (state.ctx.clone(), s.actor(), action.to_string());
    let n = state
        .db
        .write(move |c| {
            for id in &ids {
                if act == "approve" {
                    applications::approve_in(c, &ctx, id, &actor, expires)?;
                } else {
                    applications::reject_in(c, &ctx, id, &actor, &reason)?;
                }
            }
            Ok(ids.len())
        })
        .await;
    match n {
        Ok(n) => {
            state.gate.cache.clear();
            state.mail_queued();
            let verb = if action == "approve" {
                "approved"
            } else {
                "rejected"
            };
            let sep = if back.contains('?') { '&' } else { '?' };
            Ok(see_other(&format!("{back}{sep}notice={n}+{verb}")))
        }
        Err(e) => Ok(e.error_response_html()),
    }
}

// ---------------------------------------------------------------- grants

#[derive(Deserialize, Default)]
#[serde(default)]
struct GrantFilter {
    model: String,
    state: String,
    notice: String,
}

struct GrantRow {
    id: String,
    email: String,
    model: String,
    created: String,
    expires: String,
    expires_date: String,
    state: String,
    tokens: Vec<(String, String, bool)>,
}

#[derive(Template)]
#[template(path = "grants.html")]
struct GrantsPage {
    csrf: String,
    notice: Option<String>,
    models: Vec<String>,
    states: [&'static str; 4],
    f_model: String,
    f_state: String,
    rows: Vec<GrantRow>,
}

async fn grants(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<GrantFilter>,
) -> Result<HttpResponse> {
    let s = admin_or_return!(session(&req, &state).await);
    let f = q.into_inner();
    let f_state = if ["active", "expired", "revoked", "all"].contains(&f.state.as_str()) {
        f.state.clone()
    } else {
        "active".to_string()
    };
    let m = f.model.clone();
    let (list, models) = state
        .db
        .read(move |c| {
            let grants = people::list_grants(c, (!m.is_empty()).then_some(m.as_str()))?;
            let mut out = Vec::new();
            for (g, email) in grants {
                let tokens = token_rows::list_for_grant(c, &g.id)?;
                out.push((g, email, tokens));
            }
            Ok((
                out,
                catalog::list_models(c)?
                    .into_iter()
                    .map(|m| m.id)
                    .collect::<Vec<_>>(),
            ))
        })
        .await?;
    let now = util::now();
    let rows = list
        .into_iter()
        .filter_map(|(g, email, tokens)| {
            let st = if g.revoked_at.is_some() {
                "revoked"
            } else if g.expires_at.is_some_and(|e| e <= now) {
                "expired"
            } else {
                "active"
            };
            if f_state != "all" && st != f_state {
                return None;
            }
            Some(GrantRow {
                id: g.id,
                email,
                model: g.model_id,
                created: date(g.created_at),
                expires: g.expires_at.map(date).unwrap_or_else(|| "never".into()),
                expires_date: g
                    .expires_at
                    .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
                    .map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_default(),
                state: st.to_string(),
                tokens: tokens
                    .into_iter()
                    .map(|t| {
                        (
                            t.jti,
                            if t.label.is_empty() {
                                date(t.issued_at)
                            } else {
                                t.label
                            },
                            t.revoked_at.is_some(),
                        )
                    })
                    .collect(),
            })
        })
        .collect();
    let notice = (!f.notice.is_empty()).then_some(f.notice);
    Ok(html(
        StatusCode::OK,
        &GrantsPage {
            csrf: s.csrf,
            notice,
            models,
            states: ["active", "expired", "revoked", "all"],
            f_model: f.model,
            f_state,
            rows,
        },
    ))
}

async fn grant_expiry(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let s = admin_or_return!(posted(&req, &state, &f).await);
    let expires = match field(&f, "expires") {
        "" => None,
        d => match chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d") {
            Ok(d) => d.and_hms_opt(23, 59, 59).map(|t| t.and_utc().timestamp()),
            Err(_) => {
                return Ok(
                    Error::invalid_field("expires", "a date like 2026-12-31").error_response_html()
                );
            }
        },
    };
    let (id, actor) = (id.into_inner(), s.actor());
    let r = state
        .db
        .write(move |c| {
            let g = people::find_grant(c, &id)?
                .ok_or_else(|| Error::not_found("grant_not_found", "No such grant."))?;
            if !people::set_grant_expiry(c, &id, expires)? {
                return Err(Error::conflict("grant_revoked", "This grant is revoked."));
            }
            audit::append(
                c,
                &[Event::new("grant_expiry_changed", "ok")
                    .actor(&actor)
                    .model(&g.model_id)
                    .detail(json!({"grant": id, "from": g.expires_at, "to": expires}))],
            )
        })
        .await;
    state.gate.cache.clear();
    Ok(redirect_or_error(r, "/admin/grants?notice=expiry+changed"))
}

/// After a form's change: back to `to` when it was made, else the error as a page.
fn redirect_or_error<T>(r: Result<T>, to: &str) -> HttpResponse {
    match r {
        Ok(_) => see_other(to),
        Err(e) => e.error_response_html(),
    }
}

async fn grant_revoke(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let s = admin_or_return!(posted(&req, &state, &f).await);
    let reason = field(&f, "reason")
        .trim()
        .chars()
        .take(200)
        .collect::<String>();
    let reason = if reason.is_empty() {
        "revoked by an administrator".to_string()
    } else {
        reason
    };
    let (id, actor, ctx) = (id.into_inner(), s.actor(), state.ctx.clone());
    let r = state
        .db
        .write(move |c| applications::revoke_grant_in(c, &ctx, &id, &actor, &reason))
        .await;
    state.mail_queued();
    state.gate.cache.clear();
    Ok(redirect_or_error(r, "/admin/grants?notice=grant+revoked"))
}

async fn token_revoke(
    req: HttpRequest,
    state: web::Data<State>,
    jti: web::Path<String>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let s = admin_or_return!(posted(&req, &state, &f).await);
    let (jti, actor, ctx) = (jti.into_inner(), s.actor(), state.ctx.clone());
    let r = state
        .db
        .write(move |c| applications::revoke_token_in(c, &ctx, &jti, &actor))
        .await;
    state.mail_queued();
    state.gate.cache.clear();
    Ok(redirect_or_error(r, "/admin/grants?notice=token+revoked"))
}

// ---------------------------------------------------------------- models

#[derive(Template)]
#[template(path = "models.html")]
struct ModelsPage {
    csrf: String,
    notice: Option<String>,
    rows: Vec<(String, String, String)>,
}

async fn models(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse> {
    let s = admin_or_return!(session(&req, &state).await);
    let rows = state
        .db
        .read(|c| {
            let mut out = Vec::new();
            for m in catalog::list_models(c)? {
                let main = catalog::ref_commit(c, &m.id, "main")?.unwrap_or_default();
                out.push((m.id, m.gating, main));
            }
            Ok(out)
        })
        .await?;
    Ok(html(
        StatusCode::OK,
        &ModelsPage {
            csrf: s.csrf,
            notice: None,
            rows,
        },
    ))
}

#[derive(Template)]
#[template(path = "model_edit.html")]
struct ModelEdit {
    csrf: String,
    notice: Option<String>,
    error: Option<String>,
    m: Model,
    gatings: [(&'static str, &'static str); 4],
    domains: String,
    allow: String,
    deny: String,
    chart: String,
    total_downloads: usize,
    total_bytes: u64,
    top: Vec<(String, usize, u64)>,
}

const GATINGS: [(&str, &str); 4] = [
    ("manual", "manual review"),
    ("auto", "approve everyone who confirms their email"),
    ("domain", "approve allowed email domains, review the rest"),
    ("rules", "rules: domains and countries, review the rest"),
];

/// Downloads per day for 30 days as a small SVG bar chart, plus totals and top files.
fn stats(rows: &[(i64, String)], now: i64) -> (String, usize, u64, Vec<(String, usize, u64)>) {
    let today = now / 86400;
    let mut per_day = [0usize; 30];
    let mut files: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut bytes = 0u64;
    for (ts, detail) in rows {
        let day = ts / 1000 / 86400;
        let d: Value = serde_json::from_str(detail).unwrap_or(Value::Null);
        let sent = d["bytes_sent"].as_u64().unwrap_or(0);
        bytes += sent;
        if let Some(i) = usize::try_from(today - day).ok().filter(|i| *i < 30) {
            per_day[29 - i] += 1;
        }
        let e = files
            .entry(d["path"].as_str().unwrap_or("?").to_string())
            .or_default();
        e.0 += 1;
        e.1 += sent;
    }
    let max = per_day.iter().copied().max().unwrap_or(0).max(1);
    let mut svg = String::from(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="600" height="120" viewBox="0 0 600 120" role="img" aria-label="downloads per day"><line x1="0" y1="110" x2="600" y2="110" stroke="#d9dee7"/>"##,
    );
    for (i, n) in per_day.iter().enumerate() {
        let h = (*n as f64 / max as f64 * 100.0).round() as i64;
        svg.push_str(&format!(r##"<rect x="{}" y="{}" width="16" height="{h}" fill="#2459c9"><title>{n}</title></rect>"##, i * 20 + 2, 110 - h));
    }
    svg.push_str("</svg>");
    let mut top: Vec<(String, usize, u64)> =
        files.into_iter().map(|(p, (n, b))| (p, n, b)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    (svg, rows.len(), bytes, top)
}

async fn render_model(
    state: &State,
    s: &WebSession,
    id: &str,
    error: Option<String>,
    notice: Option<String>,
) -> Result<HttpResponse> {
    let id2 = id.to_string();
    let since = (util::now() - 30 * 86400) * 1000;
    let (m, rows) = state
        .db
        .read(move |c| {
            Ok((
                catalog::require_model(c, &id2)?,
                audit_rows::downloads_since(c, &id2, since)?,
            ))
        })
        .await?;
    let (chart, total_downloads, total_bytes, top) = stats(&rows, util::now());
    let page = ModelEdit {
        csrf: s.csrf.clone(),
        notice,
        error,
        domains: m.allowed_domains().join("\n"),
        allow: m.country_allow().join(", "),
        deny: m.country_deny().join(", "),
        gatings: GATINGS,
        chart,
        total_downloads,
        total_bytes,
        top,
        m,
    };
    Ok(html(StatusCode::OK, &page))
}

async fn model_page(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let s = admin_or_return!(session(&req, &state).await);
    let (org, name) = path.into_inner();
    match render_model(&state, &s, &format!("{org}/{name}"), None, None).await {
        Ok(r) => Ok(r),
        Err(e) => Ok(e.error_response_html()),
    }
}

fn codes(list: &str, field_name: &str) -> Result<Vec<String>> {
    list.split([',', ' ', '\n'])
        .map(|c| c.trim().to_uppercase())
        .filter(|c| !c.is_empty())
        .map(|c| {
            if crate::countries::is_code(&c) {
                Ok(c)
            } else {
                Err(Error::invalid_field(
                    field_name,
                    format!("{c} is not an ISO 3166-1 alpha-2 code"),
                ))
            }
        })
        .collect()
}

fn parse_settings(f: &Fields) -> Result<ModelSettings> {
    let gating = field(f, "gating");
    if !GATINGS.iter().any(|(g, _)| *g == gating) {
        return Err(Error::invalid_field(
            "gating",
            "choose one of the listed modes",
        ));
    }
    let domains: Vec<String> = field(f, "allowed_domains")
        .lines()
        .map(|d| d.trim().trim_start_matches('@').to_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    if let Some(bad) = domains.iter().find(|d| {
        !d.contains('.')
            || d.len() > 253
            || !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    }) {
        return Err(Error::invalid_field(
            "allowed_domains",
            format!("{bad:?} is not a domain name"),
        ));
    }
    let questions_text = field(f, "questions").trim();
    let questions: Vec<Question> = if questions_text.is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(questions_text)
            .map_err(|e| Error::invalid_field("questions", format!("not valid JSON: {e}")))?
    };
    if questions.len() > 30 {
        return Err(Error::invalid_field("questions", "at most 30 questions"));
    }
    for q in &questions {
        if q.label.trim().is_empty()
            || q.label.len() > 100
            || !QUESTION_KINDS.contains(&q.kind.as_str())
        {
            return Err(Error::invalid_field(
                "questions",
                format!(
                    "each question needs a label (at most 100 characters) and a kind among {}",
                    QUESTION_KINDS.join(", ")
                ),
            ));
        }
        if q.kind == "select" && q.options.is_empty() {
            return Err(Error::invalid_field(
                "questions",
                format!("{:?} is a select without options", q.label),
            ));
        }
    }
    let notify = match field(f, "notify") {
        "digest" => "digest",
        _ => "each",
    };
    let description = field(f, "description").to_string();
    let license = field(f, "license").to_string();
    if description.len() > 20_000 || license.len() > 200_000 {
        return Err(Error::invalid_field("license", "too long"));
    }
    Ok(ModelSettings {
        gating: gating.to_string(),
        allowed_domains: domains,
        country_allow: codes(field(f, "country_allow"), "country_allow")?,
        country_deny: codes(field(f, "country_deny"), "country_deny")?,
        questions,
        description,
        license,
        allow_reapply: field(f, "allow_reapply") == "true",
        notify: notify.to_string(),
    })
}

async fn model_save(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let f = form.into_inner();
    let s = admin_or_return!(posted(&req, &state, &f).await);
    let (org, name) = path.into_inner();
    let id = format!("{org}/{name}");
    let settings = match parse_settings(&f) {
        Ok(v) => v,
        Err(e) => return render_model(&state, &s, &id, Some(e.message), None).await,
    };
    let (i2, actor) = (id.clone(), s.actor());
    let r = state
        .db
        .write(move |c| {
            let before = catalog::require_model(c, &i2)?;
            catalog::update_settings(c, &i2, &settings, util::now())?;
            audit::append(c, &[Event::new("model_settings_changed", "ok").actor(&actor).model(&i2).detail(json!({
                "gating": {"from": before.gating, "to": settings.gating},
                "allowed_domains": settings.allowed_domains, "country_allow": settings.country_allow,
                "country_deny": settings.country_deny, "questions": settings.questions.len(),
                "allow_reapply": settings.allow_reapply, "notify": settings.notify,
            }))])
        })
        .await;
    match r {
        Ok(()) => render_model(&state, &s, &id, None, Some("Saved.".into())).await,
        Err(e) => Ok(e.error_response_html()),
    }
}

// ---------------------------------------------------------------- audit log

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuditFilter {
    kind: String,
    model: String,
    since: String,
    before: Option<i64>,
}

impl AuditFilter {
    fn since_ms(&self) -> Option<i64> {
        chrono::NaiveDate::parse_from_str(&self.since, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis())
    }

    fn query(&self) -> String {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, paths::SEGMENT).to_string();
        format!(
            "kind={}&model={}&since={}",
            enc(&self.kind),
            enc(&self.model),
            enc(&self.since)
        )
    }
}

struct AuditLine {
    seq: i64,
    ts: String,
    kind: String,
    outcome: String,
    actor: String,
    model: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    csrf: String,
    notice: Option<String>,
    f_kind: String,
    f_model: String,
    f_since: String,
    query: String,
    rows: Vec<AuditLine>,
    next: Option<String>,
}

async fn audit_page(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<AuditFilter>,
) -> Result<HttpResponse> {
    let s = admin_or_return!(session(&req, &state).await);
    let f = q.into_inner();
    let (kind, model, since, before) = (
        f.kind.clone(),
        f.model.clone(),
        f.since_ms(),
        f.before.unwrap_or(i64::MAX),
    );
    let rows = state
        .db
        .read(move |c| {
            audit_rows::page_desc(
                c,
                before,
                100,
                (!kind.is_empty()).then_some(kind.as_str()),
                (!model.is_empty()).then_some(model.as_str()),
                since,
            )
        })
        .await?;
    let next = (rows.len() == 100).then(|| {
        format!(
            "/admin/audit?{}&before={}",
            f.query(),
            rows.last().map(|r| r.seq).unwrap_or(0)
        )
    });
    let rows = rows
        .into_iter()
        .map(|r| AuditLine {
            seq: r.seq,
            ts: date(r.ts_ms / 1000),
            kind: r.kind,
            outcome: r.outcome,
            actor: r.actor.unwrap_or_default(),
            model: r.model_id.unwrap_or_default(),
            detail: r.detail,
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &AuditPage {
            csrf: s.csrf,
            notice: None,
            query: f.query(),
            f_kind: f.kind,
            f_model: f.model,
            f_since: f.since,
            rows,
            next,
        },
    ))
}

async fn audit_csv(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<AuditFilter>,
) -> Result<HttpResponse> {
    let _s = admin_or_return!(session(&req, &state).await);
    let f = q.into_inner();
    let (kind, model, since) = (f.kind.clone(), f.model.clone(), f.since_ms());
    let rows = state
        .db
        .read(move |c| {
            audit_rows::page_desc(
                c,
                i64::MAX,
                100_000,
                (!kind.is_empty()).then_some(kind.as_str()),
                (!model.is_empty()).then_some(model.as_str()),
                since,
            )
        })
        .await?;
    let mut body = String::from(audit::CSV_HEADER);
    body.push('\n');
    for r in rows.iter().rev() {
        body.push_str(&audit::csv_line(r));
        body.push('\n');
    }
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"weightgate-audit.csv\"",
        ))
        .body(body))
}

/// The queue's selection as CSV; cells a spreadsheet would run as formulas are defused.
async fn applications_csv(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<QueueFilter>,
) -> Result<HttpResponse> {
    let _s = admin_or_return!(session(&req, &state).await);
    let mut f = q.into_inner();
    let (apps, _) = filtered(&state, &mut f).await?;
    let mut body = String::from(
        "id,model,status,name,email,affiliation,country,intended_use,answers,applied,reason\n",
    );
    for a in apps {
        let cells = [
            a.id,
            a.model_id,
            a.status,
            a.name,
            a.email,
            a.affiliation,
            a.country,
            a.intended_use,
            a.answers,
            util::rfc3339(a.created_at),
            a.reason.unwrap_or_default(),
        ];
        body.push_str(
            &cells
                .iter()
                .map(|c| audit::csv_cell(c))
                .collect::<Vec<_>>()
                .join(","),
        );
        body.push('\n');
    }
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"weightgate-applications.csv\"",
        ))
        .body(body))
}
