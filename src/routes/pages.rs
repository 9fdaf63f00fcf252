//! The researcher's pages: catalogue, model page with the application form, what happens
//! next, and the status page with self-service tokens. Forms post as
//! `application/x-www-form-urlencoded` and work without JavaScript; every value is escaped by
//! the templates.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::apply::KeyQuery;
use crate::State;
use crate::applications::{self, ApplicationForm};
use crate::auth::access::{self, IssueRequest};
use crate::db::models::catalog::{self, Model};
use crate::error::{Error, Result};
use crate::{countries, paths, util};

/// Renders a template, or a plain 500 if rendering itself fails.
pub fn html(status: StatusCode, t: &impl Template) -> HttpResponse {
    match t.render() {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .insert_header((header::X_FRAME_OPTIONS, "DENY"))
            .insert_header(("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'"))
            .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
            .insert_header(("Referrer-Policy", "no-referrer"))
            .body(body),
        Err(e) => Error::internal(format!("template: {e}")).error_response_html(),
    }
}

/// Whether a browser asked for this page (rather than an API client).
pub fn wants_html(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct Message {
    pub title: String,
    pub message: String,
    pub error: bool,
    pub link: Option<(String, String)>,
}

impl Error {
    /// This error as a page for a browser.
    pub fn error_response_html(&self) -> HttpResponse {
        let page = Message {
            title: "Something is not right".into(),
            message: self.message.clone(),
            error: true,
            link: Some(("/".into(), "Back to the models".into())),
        };
        match page.render() {
            Ok(body) => HttpResponse::build(self.status)
                .content_type("text/html; charset=utf-8")
                .body(body),
            Err(_) => HttpResponse::build(self.status).body(self.message.clone()),
        }
    }
}

pub async fn static_file(path: web::Path<String>) -> HttpResponse {
    let (body, kind) = match path.as_str() {
        "app.css" => (
            include_str!("../../admin-ui/static/app.css"),
            "text/css; charset=utf-8",
        ),
        "app.js" => (
            include_str!("../../admin-ui/static/app.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return HttpResponse::NotFound().finish(),
    };
    HttpResponse::Ok()
        .content_type(kind)
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(body)
}

#[derive(Template)]
#[template(path = "catalogue.html")]
struct Catalogue {
    models: Vec<Model>,
}

pub async fn catalogue(state: web::Data<State>) -> Result<HttpResponse> {
    let models = state.db.read(catalog::list_models).await?;
    Ok(html(StatusCode::OK, &Catalogue { models }))
}

/// A question as the form shows it, with what was entered.
struct FormQuestion {
    label: String,
    kind: String,
    options: Vec<String>,
    required: bool,
    value: String,
}

#[derive(Template)]
#[template(path = "model.html")]
struct ModelPage {
    model: Model,
    countries: &'static [&'static str],
    questions: Vec<FormQuestion>,
    form: FormValues,
    error: Option<String>,
}

#[derive(Default)]
struct FormValues {
    name: String,
    email: String,
    affiliation: String,
    country: String,
    intended_use: String,
}

fn model_page(model: Model, fields: &[(String, String)], error: Option<String>) -> ModelPage {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let questions = model
        .questions()
        .into_iter()
        .map(|q| FormQuestion {
            value: get(&format!("answer:{}", q.label)),
            label: q.label,
            kind: q.kind,
            options: q.options,
            required: q.required,
        })
        .collect();
    ModelPage {
        form: FormValues {
            name: get("name"),
            email: get("email"),
            affiliation: get("affiliation"),
            country: get("country"),
            intended_use: get("intended_use"),
        },
        model,
        countries: countries::all(),
        questions,
        error,
    }
}

async fn load_model(state: &State, org: &str, name: &str) -> Result<Model> {
    let id = format!("{org}/{name}");
    paths::validate_repo_id(&id)
        .map_err(|_| Error::not_found("model_not_found", "There is no such model."))?;
    state
        .db
        .read(move |c| catalog::find_model(c, &id))
        .await?
        .ok_or_else(|| Error::not_found("model_not_found", "There is no such model."))
}

pub async fn model(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    let (org, name) = path.into_inner();
    match load_model(&state, &org, &name).await {
        Ok(m) => Ok(html(StatusCode::OK, &model_page(m, &[], None))),
        Err(e) => Ok(e.error_response_html()),
    }
}

#[derive(Template)]
#[template(path = "applied.html")]
struct Applied {
    model: String,
    status_url: String,
    auto: bool,
}

/// The form's fields, in order; repeated names are kept.
type Fields = Vec<(String, String)>;

/// `POST /models/{org}/{name}/apply` from the page's form.
pub async fn apply_form(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    form: web::Form<Fields>,
) -> Result<HttpResponse> {
    let (org, name) = path.into_inner();
    let model = match load_model(&state, &org, &name).await {
        Ok(m) => m,
        Err(e) => return Ok(e.error_response_html()),
    };
    let fields = form.into_inner();
    if fields.len() > 200 {
        return Ok(
            Error::bad_request("too_many_fields", "The form has too many fields.")
                .error_response_html(),
        );
    }
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut answers = serde_json::Map::new();
    for (k, v) in &fields {
        if let Some(label) = k.strip_prefix("answer:")
            && !v.is_empty()
        {
            answers.insert(label.to_string(), serde_json::Value::String(v.clone()));
        }
    }
    let app = ApplicationForm {
        name: get("name"),
        email: get("email"),
        affiliation: get("affiliation"),
        country: get("country"),
        intended_use: get("intended_use"),
        accept_license: get("accept_license") == "true",
        answers,
    };
    match applications::submit(&state.db, &state.ctx, &model.id, app).await {
        Ok(done) => {
            state.mail_queued();
            Ok(html(
                StatusCode::OK,
                &Applied {
                    auto: model.gating == "auto",
                    model: model.id,
                    status_url: done.status_url,
                },
            ))
        }
        Err(e) if e.status.is_client_error() => {
            Ok(html(e.status, &model_page(model, &fields, Some(e.message))))
        }
        Err(e) => Err(e),
    }
}

#[derive(Template)]
#[template(path = "confirmed.html")]
pub struct Confirmed {
    pub model: String,
    pub next: String,
    pub status: String,
}

struct TokenLine {
    jti: String,
    label: String,
    issued: String,
    expires: String,
    last_used: String,
    downloads: String,
    revoked: bool,
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    s: applications::Status,
    expires: Option<String>,
    tokens: Vec<TokenLine>,
    new_token: Option<String>,
    base: String,
    key: String,
    public_url: String,
}

fn date(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// The status page for a browser.
pub async fn status_page(
    state: &State,
    id: &str,
    key: &str,
    new_token: Option<String>,
) -> Result<HttpResponse> {
    let s = applications::status(&state.db, id, key).await?;
    let tokens = s
        .tokens
        .iter()
        .map(|t| TokenLine {
            jti: t.jti.clone(),
            label: t.label.clone(),
            issued: date(t.issued_at),
            expires: date(t.expires_at),
            last_used: t.last_used_at.map(date).unwrap_or_else(|| "never".into()),
            downloads: match t.max_downloads {
                Some(m) => format!("{} of {m}", t.downloads_completed),
                None => t.downloads_completed.to_string(),
            },
            revoked: t.revoked_at.is_some(),
        })
        .collect();
    let page = StatusPage {
        expires: s.grant_expires_at.map(date),
        tokens,
        new_token,
        base: format!("/applications/{id}"),
        key: key.to_string(),
        public_url: state.settings.public_url(),
        s,
    };
    Ok(html(StatusCode::OK, &page).customize_no_store())
}

trait NoStore {
    fn customize_no_store(self) -> HttpResponse;
}

impl NoStore for HttpResponse {
    fn customize_no_store(mut self) -> HttpResponse {
        self.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        self
    }
}

#[derive(Deserialize)]
pub struct IssueForm {
    #[serde(default)]
    label: String,
    #[serde(default)]
    ttl: String,
}

/// `POST /applications/{id}/tokens?key=…` from the status page: issue, show once.
pub async fn issue_form(
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<KeyQuery>,
    form: web::Form<IssueForm>,
) -> Result<HttpResponse> {
    let form = form.into_inner();
    let ttl = match form.ttl.as_str() {
        "1d" | "7d" | "30d" => {
            util::parse_duration(&form.ttl).map_err(|e| Error::invalid_field("ttl", e))?
        }
        _ => util::parse_duration(&state.settings.tokens.default_ttl)
            .map_err(|e| Error::invalid_field("ttl", e))?,
    };
    let label = form.label.trim().to_string();
    if label.chars().count() > 100 || label.chars().any(char::is_control) {
        return Ok(
            Error::invalid_field("label", "at most 100 characters, one line").error_response_html(),
        );
    }
    let (id, key) = (id.into_inner(), q.into_inner().key);
    let (keys, policy, i2, k2) = (
        state.keys.clone(),
        state.policy.clone(),
        id.clone(),
        key.clone(),
    );
    let issued = state
        .db
        .write(move |c| {
            let app = applications::authenticate(c, &i2, &k2)?;
            if app.status != "approved" {
                return Err(Error::forbidden(
                    "not_approved",
                    "Tokens are issued once the application is approved.",
                ));
            }
            access::issue(
                c,
                &keys,
                &policy,
                &IssueRequest {
                    user_id: app.user_id.clone(),
                    model: app.model_id.clone(),
                    ttl,
                    max_downloads: None,
                    label,
                    actor: format!("user:{}", app.user_id),
                },
            )
        })
        .await;
    match issued {
        Ok(t) => status_page(&state, &id, &key, Some(t.token)).await,
        Err(e) => Ok(e.error_response_html()),
    }
}

#[derive(Deserialize)]
pub struct TokenPath {
    id: String,
    jti: String,
}

fn back_to_status(id: &str, key: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, format!("/applications/{id}?key={key}")))
        .finish()
}

/// `POST /applications/{id}/tokens/{jti}/revoke?key=…`.
pub async fn revoke_form(
    state: web::Data<State>,
    path: web::Path<TokenPath>,
    q: web::Query<KeyQuery>,
) -> Result<HttpResponse> {
    let TokenPath { id, jti } = path.into_inner();
    let key = q.into_inner().key;
    let (i2, k2) = (id.clone(), key.clone());
    let r = state
        .db
        .write(move |c| {
            let app = applications::authenticate(c, &i2, &k2)?;
            match crate::db::models::tokens::find(c, &jti)? {
                Some(t) if t.user_id == app.user_id && t.model_id == app.model_id => {}
                _ => {
                    return Err(Error::not_found(
                        "token_not_found",
                        "No such token on this application.",
                    ));
                }
            }
            access::revoke(c, &jti, &format!("user:{}", app.user_id))
        })
        .await;
    state.gate.cache.clear();
    match r {
        Ok(_) => Ok(back_to_status(&id, &key)),
        Err(e) => Ok(e.error_response_html()),
    }
}

/// `POST /applications/{id}/withdraw?key=…`.
pub async fn withdraw_form(
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<KeyQuery>,
) -> Result<HttpResponse> {
    let (id, key) = (id.into_inner(), q.into_inner().key);
    match applications::withdraw(&state.db, &id, &key).await {
        Ok(_) => Ok(back_to_status(&id, &key)),
        Err(e) => Ok(e.error_response_html()),
    }
}
