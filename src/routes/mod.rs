//! The one route table: every URL path the server answers is written here.

mod access_requests;
mod admin;
mod admin_api;
mod apply;
pub mod download;
mod hub;
mod links;
mod manifest;
mod ops;
pub(crate) mod pages;

use actix_web::{HttpRequest, web};

use crate::error::Error;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(pages::catalogue))
        .route("/static/{file}", web::get().to(pages::static_file))
        .route("/models/{org}/{name}", web::get().to(pages::model))
        .route(
            "/models/{org}/{name}/apply",
            web::post().to(pages::apply_form),
        )
        .route(
            "/applications/{id}/tokens",
            web::post().to(pages::issue_form),
        )
        .route(
            "/applications/{id}/tokens/{jti}/revoke",
            web::post().to(pages::revoke_form),
        )
        .route(
            "/applications/{id}/withdraw",
            web::post().to(pages::withdraw_form),
        )
        .configure(admin::configure)
        .route("/healthz", web::get().to(ops::healthz))
        .route("/readyz", web::get().to(ops::readyz))
        .route("/metrics", web::get().to(ops::metrics))
        .route("/api/openapi.json", web::get().to(ops::openapi))
        .route("/.well-known/jwks.json", web::get().to(ops::jwks))
        .route(
            "/api/v1/models/{org}/{name}/applications",
            web::post().to(apply::submit),
        )
        .route(
            "/api/v1/models/{org}/{name}/manifest",
            web::get().to(manifest::manifest),
        )
        .route("/applications/confirm", web::get().to(apply::confirm))
        .route("/applications/{id}", web::get().to(apply::status))
        .route(
            "/api/v1/applications/{id}/tokens",
            web::post().to(apply::issue_token),
        )
        .route(
            "/api/v1/applications/{id}/tokens/{jti}",
            web::delete().to(apply::revoke_token),
        )
        .route("/api/v1/links", web::post().to(links::mint))
        .route(
            "/api/v1/applications/{id}/withdraw",
            web::post().to(apply::withdraw),
        )
        .route("/api/v1/admin/audit", web::get().to(admin_api::audit))
        .route(
            "/api/v1/admin/webhooks",
            web::get().to(admin_api::webhooks_list),
        )
        .route(
            "/api/v1/admin/webhooks",
            web::post().to(admin_api::webhooks_add),
        )
        .route(
            "/api/v1/admin/webhooks/{id}",
            web::delete().to(admin_api::webhooks_remove),
        )
        .route(
            "/api/v1/admin/webhooks/{id}/deliveries",
            web::get().to(admin_api::webhook_deliveries),
        )
        .route(
            "/api/v1/admin/outbox/failed",
            web::get().to(admin_api::outbox_failed),
        )
        // Hugging Face Hub API (HF_ENDPOINT clients)
        .route("/api/agent-harnesses", web::get().to(hub::agent_harnesses))
        .route("/api/models/{org}/{name}", web::get().to(hub::model_info))
        .route(
            "/api/models/{org}/{name}/revision/{tail:.*}",
            web::get().to(hub::revision_info),
        )
        .route(
            "/api/models/{org}/{name}/tree/{tail:.*}",
            web::get().to(hub::tree),
        )
        .route(
            "/api/models/{org}/{name}/user-access-request/handle",
            web::post().to(access_requests::handle),
        )
        .route(
            "/api/models/{org}/{name}/user-access-request/grant",
            web::post().to(access_requests::grant),
        )
        .route(
            "/api/models/{org}/{name}/user-access-request/{status}",
            web::get().to(access_requests::list),
        )
        .route(
            "/api/models/{org}/{name}/settings",
            web::put().to(access_requests::settings),
        )
        .service(
            web::resource("/{org}/{name}/resolve/{tail:.*}")
                .route(web::get().to(download::resolve))
                .route(web::head().to(download::resolve)),
        )
        .default_service(web::to(ops::not_found));
}

/// JSON bodies: small, and parse errors answered in the common error shape.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(64 * 1024)
        .error_handler(|err, _req: &HttpRequest| {
            use actix_web::error::JsonPayloadError as E;
            let e = match &err {
                E::OverflowKnownLength { .. } | E::Overflow { .. } => Error::new(
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "The request body is larger than 64 KiB.",
                ),
                E::ContentType => {
                    Error::bad_request("bad_content_type", "Send the body as application/json.")
                }
                E::Deserialize(d) => {
                    Error::bad_request("bad_json", format!("The JSON body is not valid: {d}"))
                }
                other => Error::bad_request(
                    "bad_json",
                    format!("The JSON body could not be read: {other}"),
                ),
            };
            e.into()
        })
}

pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _req: &HttpRequest| {
        Error::bad_request("bad_query", format!("The query string is not valid: {err}")).into()
    })
}

/// The token of an `Authorization: Bearer …` header (scheme matched case-insensitively);
/// `None` when there is no header or it uses another scheme.
pub(crate) fn bearer_header(req: &HttpRequest) -> Option<String> {
    let v = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = v.split_once(' ').unwrap_or((v, ""));
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The bearer token from the header, else from `?token=` (signed-URL style downloads).
pub(crate) fn bearer(req: &HttpRequest) -> Option<String> {
    bearer_header(req).or_else(|| {
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
    })
}
