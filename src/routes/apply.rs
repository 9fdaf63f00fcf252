//! Researcher endpoints: apply, confirm the email, read the status, issue a token.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::State;
use crate::applications::{self, ApplicationForm};
use crate::auth::access::{self, IssueRequest};
use crate::error::{Error, Result};
use crate::util;

pub async fn submit(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    form: web::Json<ApplicationForm>,
) -> Result<HttpResponse> {
    let (org, name) = path.into_inner();
    let model = format!("{org}/{name}");
    crate::paths::validate_repo_id(&model)?;
    let submitted = applications::submit(&state.db, &state.ctx, &model, form.into_inner()).await?;
    state.mail_queued();
    Ok(HttpResponse::Created()
        .insert_header(("Location", submitted.status_url.clone()))
        .json(submitted))
}

#[derive(Deserialize)]
pub struct CodeQuery {
    code: String,
}

fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"))
}

pub async fn confirm(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<CodeQuery>,
) -> Result<HttpResponse> {
    if q.code.len() > 200 {
        return Err(Error::bad_request(
            "bad_code",
            "This confirmation link is not valid.",
        ));
    }
    let app = applications::confirm(&state.db, &state.ctx, &q.code).await?;
    state.mail_queued();
    let body = serde_json::json!({"id": app.id, "model": app.model_id, "status": app.status});
    if wants_json(&req) {
        return Ok(HttpResponse::Ok().json(body));
    }
    let next = match app.status.as_str() {
        "approved" => {
            "Your application has been approved: the email we just sent explains how to download."
        }
        "pending" => {
            "Your application is now waiting for review; you will get an email when it has been decided."
        }
        _ => "Your application has already been handled; see your status page.",
    };
    Ok(super::pages::html(
        actix_web::http::StatusCode::OK,
        &super::pages::Confirmed {
            model: app.model_id.clone(),
            next: next.to_string(),
            status: app.status.clone(),
        },
    ))
}

#[derive(Deserialize)]
pub struct KeyQuery {
    pub key: String,
}

pub async fn status(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<KeyQuery>,
) -> Result<HttpResponse> {
    if super::pages::wants_html(&req) {
        return match super::pages::status_page(&state, &id, &q.key, None).await {
            Ok(page) => Ok(page),
            Err(e) => Ok(e.error_response_html()),
        };
    }
    let status = applications::status(&state.db, &id, &q.key).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(status))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    ttl: Option<String>,
    label: Option<String>,
}

/// An approved researcher issues themselves a token (authenticated by the status key).
pub async fn issue_token(
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<KeyQuery>,
    body: Option<web::Json<IssueBody>>,
) -> Result<HttpResponse> {
    let body = body.map(|b| b.into_inner()).unwrap_or_default();
    let ttl = util::parse_duration(
        body.ttl
            .as_deref()
            .unwrap_or(&state.settings.tokens.default_ttl),
    )
    .map_err(|e| Error::invalid_field("ttl", e))?;
    let label = body.label.unwrap_or_default();
    if label.chars().count() > 100 || label.chars().any(char::is_control) {
        return Err(Error::invalid_field(
            "label",
            "at most 100 characters, one line",
        ));
    }
    let (id, key) = (id.into_inner(), q.into_inner().key);
    let (keys, policy) = (state.keys.clone(), state.policy.clone());
    let issued = state
        .db
        .write(move |c| {
            let app = applications::authenticate(c, &id, &key)?;
            if app.status != "approved" {
                return Err(Error::forbidden(
                    "not_approved",
                    format!(
                        "This application is {}; tokens are issued once it is approved.",
                        app.status
                    ),
                ));
            }
            let req = IssueRequest {
                user_id: app.user_id.clone(),
                model: app.model_id.clone(),
                ttl,
                max_downloads: None,
                label,
                actor: format!("user:{}", app.user_id),
            };
            access::issue(c, &keys, &policy, &req)
        })
        .await?;
    Ok(HttpResponse::Created()
        .insert_header(("Cache-Control", "no-store"))
        .json(issued))
}

#[derive(Deserialize)]
pub struct TokenPath {
    id: String,
    jti: String,
}

/// A researcher revokes one of their own tokens (authenticated by the status key).
pub async fn revoke_token(
    state: web::Data<State>,
    path: web::Path<TokenPath>,
    q: web::Query<KeyQuery>,
) -> Result<HttpResponse> {
    let TokenPath { id, jti } = path.into_inner();
    let key = q.into_inner().key;
    let row = state
        .db
        .write(move |c| {
            let app = applications::authenticate(c, &id, &key)?;
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
        .await?;
    state.gate.cache.clear();
    Ok(HttpResponse::Ok().json(serde_json::json!({"jti": row.jti, "revoked": true})))
}

/// The researcher withdraws an open application (authenticated by the status key).
pub async fn withdraw(
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<KeyQuery>,
) -> Result<HttpResponse> {
    let app = applications::withdraw(&state.db, &id, &q.key).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"id": app.id, "status": app.status})))
}
