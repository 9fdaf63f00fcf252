//! `/api/v1/admin/…`: administrator actions as JSON for automation (admin API token).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::State;
use crate::audit;
use crate::auth::admin;
use crate::db::models::audit as rows;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events at or after this time (RFC 3339).
    since: Option<String>,
    model: Option<String>,
    format: Option<String>,
    /// Events after this sequence number (the `Link` header gives the next page).
    after: Option<i64>,
    limit: Option<i64>,
}

/// `GET /api/v1/admin/audit?since=&model=&format=jsonl|csv&after=&limit=`: a page of the
/// audit log, with `Link: rel="next"` while more follows.
pub async fn audit(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<AuditQuery>,
) -> Result<HttpResponse> {
    admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let q = q.into_inner();
    let since_ms = match q.since.as_deref() {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    Error::invalid_field(
                        "since",
                        "must be an RFC 3339 time such as 2026-01-31T00:00:00Z",
                    )
                })?
                .timestamp_millis(),
        ),
    };
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(Error::invalid_field("limit", "must be 1 to 10000"));
    }
    let csv = match q.format.as_deref() {
        None | Some("jsonl") => false,
        Some("csv") => true,
        Some(_) => return Err(Error::invalid_field("format", "use jsonl or csv")),
    };
    let after = q.after.unwrap_or(0).max(0);
    let model = q.model.clone();
    let page = state
        .db
        .read(move |c| rows::page_filtered(c, after, limit, since_ms, model.as_deref()))
        .await?;
    let mut body = String::new();
    if csv {
        body.push_str(audit::CSV_HEADER);
        body.push('\n');
    }
    for r in &page {
        if csv {
            body.push_str(&audit::csv_line(r));
        } else {
            body.push_str(&audit::export_value(r).to_string());
        }
        body.push('\n');
    }
    let mut resp = HttpResponse::Ok();
    resp.content_type(if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    });
    if let (Some(last), true) = (page.last(), page.len() as i64 == limit) {
        let mut next = format!(
            "{}/api/v1/admin/audit?after={}&limit={limit}",
            state.settings.public_url(),
            last.seq
        );
        for (k, v) in [
            ("since", &q.since),
            ("model", &q.model),
            ("format", &q.format),
        ] {
            if let Some(v) = v {
                next.push_str(&format!(
                    "&{k}={}",
                    percent_encoding::utf8_percent_encode(v, crate::paths::SEGMENT)
                ));
            }
        }
        resp.insert_header((header::LINK, format!("<{next}>; rel=\"next\"")));
    }
    Ok(resp.body(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    url: String,
    secret: String,
    #[serde(default)]
    events: Vec<String>,
}

/// `GET /api/v1/admin/webhooks`.
pub async fn webhooks_list(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse> {
    admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let list = state.db.read(crate::db::models::webhooks::list).await?;
    Ok(HttpResponse::Ok().json(list))
}

/// `POST /api/v1/admin/webhooks` with `{"url", "secret", "events": [...]}`.
pub async fn webhooks_add(
    req: HttpRequest,
    state: web::Data<State>,
    body: web::Json<NewWebhook>,
) -> Result<HttpResponse> {
    let who = admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let b = body.into_inner();
    let w = state
        .db
        .write(move |c| {
            let w = crate::webhooks::add(c, &b.url, &b.secret, &b.events)?;
            audit::append(
                c,
                &[audit::Event::new("webhook_added", "ok")
                    .actor(who.actor())
                    .detail(serde_json::json!({"webhook": w.id, "events": w.events}))],
            )?;
            Ok(w)
        })
        .await?;
    Ok(HttpResponse::Created().json(w))
}

/// `DELETE /api/v1/admin/webhooks/{id}`: stops deliveries to it.
pub async fn webhooks_remove(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let id = id.into_inner();
    let done = state
        .db
        .write(move |c| crate::db::models::webhooks::disable(c, &id, crate::util::now()))
        .await?;
    if !done {
        return Err(Error::not_found(
            "webhook_not_found",
            "No active webhook with that id.",
        ));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /api/v1/admin/webhooks/{id}/deliveries`: the endpoint's delivery log, newest first.
pub async fn webhook_deliveries(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let id = id.into_inner();
    let list = state
        .db
        .read(move |c| crate::db::models::webhooks::deliveries(c, &id, 200))
        .await?;
    Ok(HttpResponse::Ok().json(list))
}

/// `GET /api/v1/admin/outbox/failed`: mail that could not be delivered.
pub async fn outbox_failed(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse> {
    admin::authenticate(&state.db, super::bearer_header(&req).as_deref()).await?;
    let list = state
        .db
        .read(|c| crate::db::models::outbox::failed(c, 200))
        .await?;
    let view: Vec<serde_json::Value> = list
        .iter()
        .map(|m| serde_json::json!({"id": m.id, "kind": m.kind, "to": m.to_addr, "subject": m.subject, "attempts": m.attempts, "failed_at": m.failed_at, "error": m.last_error}))
        .collect();
    Ok(HttpResponse::Ok().json(view))
}
