//! The Hub's gated-repo management API (`HfApi.list_pending_access_requests`,
//! `accept_access_request`, `reject_access_request`, `cancel_access_request`, `grant_access`,
//! `update_repo_settings(gated=…)`), acting on weightgate's applications for an administrator
//! API token. A researcher's Hub "user" is their email address.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::applications;
use crate::audit::{self, Event};
use crate::auth::admin::{self, AdminPrincipal};
use crate::db::models::access::{self as people, APPROVED, Application, PENDING, REJECTED};
use crate::db::models::catalog;
use crate::error::{Error, Result};
use crate::{paths, util};

const PAGE: usize = 100;

/// Administrator tokens are read from the Authorization header only, never from a URL.
async fn admin_for(req: &HttpRequest, state: &State) -> Result<AdminPrincipal> {
    admin::authenticate(&state.db, super::bearer_header(req).as_deref()).await
}

fn model_of(path: &(String, String)) -> Result<String> {
    let id = format!("{}/{}", path.0, path.1);
    paths::validate_repo_id(&id)?;
    Ok(id)
}

fn item(a: &Application) -> Value {
    // The researcher's custom answers first, then the standard fields, so an answer can
    // never pose as one of them.
    let mut fields = match serde_json::from_str::<Value>(&a.answers) {
        Ok(Value::Object(answers)) => answers,
        _ => serde_json::Map::new(),
    };
    fields.insert("Name".into(), json!(a.name));
    fields.insert("Affiliation".into(), json!(a.affiliation));
    fields.insert("Country".into(), json!(a.country));
    fields.insert("Intended use".into(), json!(a.intended_use));
    let status = match a.status.as_str() {
        APPROVED => "accepted",
        other => other,
    };
    json!({
        "user": {"user": a.email, "fullname": a.name, "email": a.email, "_id": a.user_id,
                 "avatarUrl": "", "isPro": false, "type": "user"},
        "requestId": a.id,
        "status": status,
        "timestamp": util::rfc3339(a.decided_at.unwrap_or(a.created_at)),
        "fields": fields,
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    cursor: Option<usize>,
}

/// `GET /api/models/{org}/{name}/user-access-request/{pending|accepted|rejected}`.
pub async fn list(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String, String)>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse> {
    admin_for(&req, &state).await?;
    let (org, name, which) = path.into_inner();
    let model = model_of(&(org, name))?;
    let status = match which.as_str() {
        "pending" => PENDING,
        "accepted" => APPROVED,
        "rejected" => REJECTED,
        _ => {
            return Err(Error::not_found(
                "not_found",
                "Use pending, accepted or rejected.",
            ));
        }
    };
    let m = model.clone();
    let apps = state
        .db
        .read(move |c| {
            catalog::require_model(c, &m)?;
            people::list_applications(c, Some(status), Some(&m))
        })
        .await?;
    let offset = q.cursor.unwrap_or(0);
    let page: Vec<Value> = apps.iter().skip(offset).take(PAGE).map(item).collect();
    let mut resp = HttpResponse::Ok();
    if offset.saturating_add(PAGE) < apps.len() {
        let next = format!(
            "{}/api/models/{model}/user-access-request/{which}?cursor={}",
            state.settings.public_url(),
            offset.saturating_add(PAGE)
        );
        resp.insert_header((header::LINK, format!("<{next}>; rel=\"next\"")));
    }
    Ok(resp.json(page))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandleBody {
    user: Option<String>,
    request_id: Option<String>,
    status: String,
    rejection_reason: Option<String>,
}

/// The application a `handle` call means: by request id, or the user's newest one.
fn target(c: &mut crate::db::AnyConnection, model: &str, body: &HandleBody) -> Result<Application> {
    let found = match (&body.request_id, &body.user) {
        (Some(id), _) => people::find_application(c, id)?.filter(|a| a.model_id == model),
        (None, Some(user)) => {
            match people::find_user_by_email(c, &user.trim().to_ascii_lowercase())? {
                Some(u) => people::applications_of(c, &u.id, model)?.into_iter().next(),
                None => None,
            }
        }
        (None, None) => return Err(Error::invalid_field("user", "give user or requestId")),
    };
    found.ok_or_else(|| {
        Error::not_found(
            "request_not_found",
            format!("No access request for {model} matches."),
        )
    })
}

/// `POST /api/models/{org}/{name}/user-access-request/handle`.
pub async fn handle(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    body: web::Json<HandleBody>,
) -> Result<HttpResponse> {
    let admin = admin_for(&req, &state).await?;
    let model = model_of(&path)?;
    let body = body.into_inner();
    if body
        .rejection_reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 200)
    {
        return Err(Error::invalid_field(
            "rejectionReason",
            "must be at most 200 characters",
        ));
    }
    let ctx = state.ctx.clone();
    let actor = admin.actor();
    state
        .db
        .write(move |c| {
            let app = target(c, &model, &body)?;
            match body.status.as_str() {
                "accepted" => applications::accept_in(c, &ctx, &app.id, &actor).map(|_| ()),
                "rejected" => {
                    let reason = body
                        .rejection_reason
                        .as_deref()
                        .filter(|r| !r.trim().is_empty())
                        .unwrap_or("Rejected by the model's administrators.");
                    applications::reject_in(c, &ctx, &app.id, &actor, reason).map(|_| ())
                }
                "pending" => applications::reopen_in(c, &ctx, &app.id, &actor).map(|_| ()),
                other => Err(Error::invalid_field(
                    "status",
                    format!("{other:?}: use accepted, rejected or pending"),
                )),
            }
        })
        .await?;
    state.gate.cache.clear();
    state.mail_queued();
    Ok(HttpResponse::Ok().json(json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    user: String,
}

/// `POST /api/models/{org}/{name}/user-access-request/grant`: the body must be JSON (`{}`).
pub async fn grant(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    body: web::Json<GrantBody>,
) -> Result<HttpResponse> {
    let admin = admin_for(&req, &state).await?;
    let model = model_of(&path)?;
    let ctx = state.ctx.clone();
    let actor = admin.actor();
    let user = body.into_inner().user;
    state
        .db
        .write(move |c| applications::grant_in(c, &ctx, &model, &user, &actor))
        .await?;
    state.gate.cache.clear();
    state.mail_queued();
    Ok(HttpResponse::Ok().json(json!({})))
}

#[derive(Deserialize)]
pub struct SettingsBody {
    gated: Option<Value>,
    #[allow(dead_code)]
    visibility: Option<String>,
    #[allow(dead_code)]
    private: Option<bool>,
}

/// `PUT /api/models/{org}/{name}/settings` with `{"gated": "auto" | "manual"}`.
pub async fn settings(
    req: HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    body: web::Json<SettingsBody>,
) -> Result<HttpResponse> {
    let admin = admin_for(&req, &state).await?;
    let model = model_of(&path)?;
    let gating = match body.into_inner().gated {
        None => None,
        Some(Value::String(g)) if g == "auto" || g == "manual" => Some(g),
        Some(Value::Bool(false)) => {
            return Err(Error::bad_request(
                "always_gated",
                "weightgate models are always gated; use gated=\"auto\" to approve every confirmed applicant.",
            ));
        }
        Some(other) => {
            return Err(Error::invalid_field(
                "gated",
                format!("{other}: use \"auto\" or \"manual\""),
            ));
        }
    };
    let actor = admin.actor();
    state
        .db
        .write(move |c| {
            let before = catalog::require_model(c, &model)?;
            if let Some(g) = &gating {
                catalog::set_gating(c, &model, g, util::now())?;
                audit::append(
                    c,
                    &[Event::new("model_settings_changed", "ok")
                        .actor(&actor)
                        .model(&model)
                        .detail(json!({"gating": {"from": before.gating, "to": g}}))],
                )?;
            }
            Ok(())
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({})))
}
