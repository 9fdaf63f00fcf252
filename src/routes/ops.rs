//! Operations endpoints: liveness, readiness, key publication, and the 404 of last resort.

use actix_web::{HttpResponse, web};

use crate::State;
use crate::error::{Error, Result};

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready when the database answers.
pub async fn readyz(state: web::Data<State>) -> Result<HttpResponse> {
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
    Ok(HttpResponse::Ok()
        .content_type("text/plain")
        .body("ready\n"))
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
