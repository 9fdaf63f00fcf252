//! `GET /api/v1/models/{org}/{name}/manifest?revision=…[&format=jws]`: a revision's full
//! integrity manifest (sizes, SHA-256, block hashes), optionally as a compact JWS signed with
//! the server's current key so anyone holding the JWKS can prove where a file list came from.

use actix_web::{HttpResponse, web};
use jsonwebtoken::{Algorithm, Header};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::db::models::catalog;
use crate::error::{Error, Result};
use crate::{paths, util};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestQuery {
    revision: Option<String>,
    format: Option<String>,
}

/// The manifest of one revision as JSON.
pub async fn build(state: &State, model: &str, revision: &str) -> Result<Value> {
    let (m, rev) = (model.to_string(), revision.to_string());
    let (commit, created, files) = state
        .db
        .read(move |c| {
            catalog::require_model(c, &m)?;
            let commit = catalog::resolve_revision(c, &m, &rev)?;
            let created = catalog::revision_created_at(c, &m, &commit)?;
            Ok((
                commit.clone(),
                created,
                catalog::files_with_blobs(c, &m, &commit)?,
            ))
        })
        .await?;
    let files: Vec<Value> = files
        .iter()
        .map(|(f, b)| {
            json!({
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
                "block_size": b.block_size,
                "block_algo": b.block_algo,
                "block_hashes": b.block_hashes.chunks(32).map(hex::encode).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({
        "model": model,
        "revision": revision,
        "commit": commit,
        "created_at": util::rfc3339(created),
        "files": files,
    }))
}

pub async fn manifest(
    req: actix_web::HttpRequest,
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    q: web::Query<ManifestQuery>,
) -> Result<HttpResponse> {
    let (org, name) = path.into_inner();
    let model = format!("{org}/{name}");
    paths::validate_repo_id(&model)?;
    let q = q.into_inner();
    let revision = q.revision.unwrap_or_else(|| "main".into());
    paths::validate_revision(&revision)?;
    // Checked before anything is logged, so the event holds one of two fixed words.
    let format = match q.format.as_deref() {
        None | Some("json") => "json",
        Some("jws") => "jws",
        Some(other) => {
            return Err(Error::invalid_field(
                "format",
                format!("{:?}: use json or jws", util::clip(other, 64)),
            ));
        }
    };
    let body = build(&state, &model, &revision).await?;
    let read = crate::audit::Event::new("manifest_read", "ok")
        .model(&model)
        .detail(json!({
            "revision": revision, "commit": body["commit"], "format": format,
            "client": req.peer_addr().map(|a| a.ip().to_string()),
        }));
    state.audit.log(read).await;
    match format {
        "json" => Ok(HttpResponse::Ok().json(body)),
        _ => {
            let (kid, key) = state
                .keys
                .signing()
                .ok_or_else(|| Error::internal("no signing key"))?;
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(kid);
            header.typ = Some("weightgate-manifest+json".into());
            let mut claims = body;
            claims["iss"] = json!(state.policy.issuer);
            claims["iat"] = json!(util::now());
            let jws = jsonwebtoken::encode(&header, &claims, &key)
                .map_err(|e| Error::internal(format!("manifest signing: {e}")))?;
            Ok(HttpResponse::Ok()
                .content_type("application/jose")
                .body(jws))
        }
    }
}
