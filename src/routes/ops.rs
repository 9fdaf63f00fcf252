//! Operations endpoints: liveness, readiness, key publication, and the 404 of last resort.

use actix_web::{HttpResponse, web};

use crate::State;
use crate::error::{Error, Result};

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready when the database and the storage answer, and the server is not shutting down.
pub async fn readyz(state: web::Data<State>) -> Result<HttpResponse> {
    if state
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(Error::unavailable(
            "shutting_down",
            "This server is shutting down.",
        ));
    }
    state
        .db
        .read(|c| {
            use diesel::connection::SimpleConnection;
            c.batch_execute("SELECT 1").map_err(Error::from)
        })
        .await
        .map_err(|_| {
            Error::unavailable("database_unavailable", "The database is not answering.")
        })?;
    // A missing object proves the store answers; any other error means it does not.
    match object_store::ObjectStoreExt::head(
        &*state.store.inner,
        &crate::storage::Store::path("readyz-probe"),
    )
    .await
    {
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(error = %e, "storage is not answering");
            return Err(Error::unavailable(
                "storage_unavailable",
                "The weight storage is not answering.",
            ));
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain")
        .body("ready\n"))
}

/// Prometheus metrics.
pub async fn metrics(state: web::Data<State>) -> Result<HttpResponse> {
    let (mail, hooks) = state
        .db
        .read(|c| {
            Ok((
                crate::db::models::outbox::backlog(c)?,
                crate::db::models::webhooks::backlog(c)?,
            ))
        })
        .await?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&crate::metrics::Elsewhere {
            mail_backlog: mail,
            webhook_backlog: hooks,
            audit_queued: state.audit.queued(),
            stream_bytes: state.store.blocks.counts(),
        })))
}

/// The JSON API's description (OpenAPI 3.1).
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(include_str!("openapi.json"))
}

pub async fn jwks(state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "public, max-age=60"))
        .json(state.keys.jwks())
}

pub async fn not_found() -> Result<HttpResponse> {
    Err(Error::not_found(
        "not_found",
        "There is nothing at this address.",
    ))
}
