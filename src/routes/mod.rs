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

/// The first path segments the other routes start with. A path starting with anything else
/// can only be a download (`/{org}/{name}/resolve/…`), so downloads skip the router and its
/// regex matches; paths starting with one of these take the usual order, where the download
/// route comes last.
const RESERVED_FIRST: [&str; 10] = [
    "",
    ".well-known",
    "admin",
    "api",
    "applications",
    "healthz",
    "metrics",
    "models",
    "readyz",
    "static",
];

pub const DOWNLOAD_ROUTE: &str = "/{org}/{name}/resolve/{tail:.*}";

/// Whether `path` is certainly a download, judged from its raw segments alone: exactly what
/// `DOWNLOAD_ROUTE` matches (non-empty org and name, then `resolve/`), minus the paths
/// other routes may take. A first segment with a percent escape may decode to a reserved one
/// (actix routes on the decoded path), so it takes the usual order.
pub fn is_download_path(path: &str) -> bool {
    let mut parts = path.split('/').skip(1);
    let (Some(org), Some(name), Some("resolve"), Some(_tail)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !org.is_empty() && !name.is_empty() && !org.contains('%') && !RESERVED_FIRST.contains(&org)
}

fn download_resource() -> actix_web::Resource {
    web::resource(DOWNLOAD_ROUTE)
        .route(web::get().to(download::resolve))
        .route(web::head().to(download::resolve))
}

/// The routes. `GET`/`HEAD` on a download path never get here: the request middleware in
/// `lib.rs` hands them to `download::resolve` itself (see `is_download_path`); the download
/// resource, last, answers the other methods on those paths (405).
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
        .service(download_resource())
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
    bearer_header(req).or_else(|| query_param(req, "token"))
}

/// One query-string parameter, decoded.
pub(crate) fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get(name).cloned())
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn every_other_route_starts_with_a_reserved_segment() {
        for file in [include_str!("mod.rs"), include_str!("admin.rs")] {
            let source = file.split("#[cfg(test)]").next().unwrap_or(file);
            for (i, _) in source.match_indices("\"/") {
                let rest = &source[i + 1..];
                let Some(end) = rest.find('"') else { continue };
                let pattern = &rest[..end];
                let route_like = pattern
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/{}.:*_-".contains(&b));
                if !route_like || pattern == DOWNLOAD_ROUTE {
                    continue;
                }
                let first = pattern.split('/').nth(1).unwrap_or("");
                assert!(
                    RESERVED_FIRST.contains(&first),
                    "route {pattern} starts with {first:?}, which is not in RESERVED_FIRST"
                );
            }
        }
    }

    #[test]
    fn downloads_are_told_apart_from_other_paths() {
        assert!(is_download_path("/org/model/resolve/main/a.bin"));
        assert!(is_download_path("/org/model/resolve/"));
        assert!(!is_download_path("/api/models/resolve/x"));
        assert!(!is_download_path("/models/org/resolve/apply"));
        assert!(!is_download_path("/org/model/tree/main"));
        assert!(!is_download_path("/org/resolve"));
        assert!(
            !is_download_path("/org/model/resolve"),
            "no tail: not the route"
        );
        assert!(!is_download_path("/org//resolve/x"), "empty name");
        assert!(!is_download_path("//model/resolve/x"), "empty org");
        assert!(!is_download_path("/"));
        assert!(
            !is_download_path("/%61pi/models/resolve/x"),
            "decodes to /api/…"
        );
    }
}
