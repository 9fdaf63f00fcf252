//! `POST /api/v1/links`: a client holding a valid token mints a short-lived URL for one
//! file, for `wget` or a browser, instead of pasting its long-lived token into a URL.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use crate::State;
use crate::auth::links::{self, LinkClaims};
use crate::db::models::catalog;
use crate::error::{Error, HubCode, Result};
use crate::{paths, util};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    model: String,
    path: String,
    revision: Option<String>,
    /// e.g. "15m"; never longer than the token, and at most 24 hours.
    ttl: Option<String>,
}

pub async fn mint(
    req: HttpRequest,
    state: web::Data<State>,
    body: web::Json<LinkRequest>,
) -> Result<HttpResponse> {
    let body = body.into_inner();
    paths::validate_repo_id(&body.model)?;
    paths::validate_file_path(&body.path)?;
    let principal = state
        .gate
        .authorize(super::bearer(&req).as_deref(), &body.model)
        .await?;
    let ttl = util::parse_duration(
        body.ttl
            .as_deref()
            .unwrap_or(&state.settings.tokens.link_ttl),
    )
    .map_err(|e| Error::invalid_field("ttl", e))?;
    if ttl.as_secs() > 86_400 {
        return Err(Error::invalid_field("ttl", "at most 24h"));
    }
    let (m, p, rev) = (
        body.model.clone(),
        body.path.clone(),
        body.revision.clone().unwrap_or_else(|| "main".into()),
    );
    paths::validate_revision(&rev)?;
    let commit = state
        .db
        .read(move |c| {
            catalog::require_model(c, &m)?;
            let commit = catalog::resolve_revision(c, &m, &rev)?;
            match catalog::find_file(c, &m, &commit, &p)? {
                Some(_) => Ok(commit),
                None => Err(Error::not_found(
                    "entry_not_found",
                    format!("File {p} does not exist in revision {rev} of model {m}."),
                )
                .hub(HubCode::EntryNotFound)),
            }
        })
        .await?;
    let now = util::now();
    let exp = (now + ttl.as_secs() as i64).min(principal.token_expires_at);
    let claims = LinkClaims {
        iss: state.policy.issuer.clone(),
        aud: links::audience(&state.policy),
        sub: principal.user_id.clone(),
        iat: now,
        exp,
        tok: principal.jti.clone(),
        model: body.model.clone(),
        rev: commit.clone(),
        path: body.path.clone(),
    };
    let link = links::sign(&state.keys, &claims)?;
    let url = format!(
        "{}/{}/resolve/{commit}/{}?link={link}",
        state.settings.public_url(),
        body.model,
        paths::encode_path(&body.path)
    );
    state
        .audit
        .log(
            crate::audit::Event::new("link_minted", "ok")
                .actor(format!("user:{}", principal.user_id))
                .model(&body.model)
                .detail(
                    json!({"jti": principal.jti, "path": body.path, "commit": commit, "exp": exp}),
                ),
        )
        .await;
    Ok(HttpResponse::Created()
        .insert_header(("Cache-Control", "no-store"))
        .json(json!({"url": url, "expires_at": exp})))
}
