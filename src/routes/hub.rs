//! The Hugging Face Hub's metadata API, as `HF_ENDPOINT` clients call it: model info,
//! revision info, the file tree (paginated with `Link`), and the telemetry stub. Every file
//! is presented as an LFS entry whose `lfs.oid` is its SHA-256. Metadata is public, as on
//! the Hub; only file content is gated.

use std::collections::BTreeSet;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use percent_encoding::utf8_percent_encode;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};

use crate::State;
use crate::db::models::catalog::{self, FileRow, Model};
use crate::error::{Error, HubCode, Result};
use crate::storage::manifest;
use crate::{paths, util};

/// The repo id from `{org}/{name}`, or the Hub's `RepoNotFound`.
fn repo_id(org: &str, name: &str) -> Result<String> {
    let id = format!("{org}/{name}");
    paths::validate_repo_id(&id).map_err(|_| {
        Error::not_found(
            "repo_not_found",
            format!("Model {id} does not exist on this server."),
        )
        .hub(HubCode::RepoNotFound)
    })?;
    Ok(id)
}

/// The repo id from the route's `{org}` and `{name}`.
fn repo_of(req: &HttpRequest) -> Result<String> {
    let m = req.match_info();
    repo_id(m.get("org").unwrap_or(""), m.get("name").unwrap_or(""))
}

/// The raw path after `/api/models/{org}/{name}/{kind}/`, still percent-encoded.
fn raw_tail<'a>(req: &'a HttpRequest, kind: &str) -> Result<&'a str> {
    let raw = req.uri().path();
    let mut parts = raw.splitn(7, '/'); // "", api, models, org, name, kind, tail
    let found: Vec<&str> = parts.by_ref().take(6).collect();
    if found.len() < 6 || found[5] != kind {
        return Err(Error::bad_request("bad_path", "unexpected path"));
    }
    Ok(parts.next().unwrap_or(""))
}

fn gated_value(m: &Model) -> Value {
    match m.gating.as_str() {
        "auto" => json!("auto"),
        _ => json!("manual"),
    }
}

/// The `lfs` object of an entry; the Hub names the SHA-256 `sha256` in model info's
/// siblings and `oid` in tree entries.
fn lfs_entry(f: &FileRow, key: &str) -> Value {
    let pointer = manifest::lfs_pointer(&f.sha256, f.size as u64);
    json!({key: f.sha256, "size": f.size, "pointerSize": pointer.len()})
}

async fn info(state: &State, model: &str, rev: &str, blobs: bool) -> Result<HttpResponse> {
    let (m, r) = (model.to_string(), rev.to_string());
    let (meta, commit, created, files) = state
        .db
        .read(move |c| {
            let meta = catalog::require_model(c, &m)?;
            let commit = catalog::resolve_revision(c, &m, &r)?;
            let created = catalog::revision_created_at(c, &m, &commit)?;
            let files = catalog::list_files(c, &m, &commit)?;
            Ok((meta, commit, created, files))
        })
        .await?;
    let siblings: Vec<Value> = files
        .iter()
        .map(|f| {
            if blobs {
                json!({"rfilename": f.path, "size": f.size, "blobId": f.git_oid, "lfs": lfs_entry(f, "sha256")})
            } else {
                json!({"rfilename": f.path})
            }
        })
        .collect();
    let org = model.split('/').next().unwrap_or_default();
    Ok(HttpResponse::Ok().json(json!({
        "_id": model,
        "id": model,
        "modelId": model,
        "author": org,
        "sha": commit,
        "lastModified": util::rfc3339(created),
        "createdAt": util::rfc3339(meta.created_at),
        "private": false,
        "disabled": false,
        "gated": gated_value(&meta),
        "tags": [],
        "cardData": {"license": meta.license},
        "siblings": siblings,
    })))
}

#[derive(serde::Deserialize)]
pub struct InfoQuery {
    blobs: Option<String>,
}

fn flag(v: Option<&str>) -> bool {
    v.is_some_and(|s| s.eq_ignore_ascii_case("true") || s == "1")
}

/// `GET /api/models/{org}/{name}`: the `main` revision.
pub async fn model_info(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    q: web::Query<InfoQuery>,
) -> Result<HttpResponse> {
    let (org, name) = path.into_inner();
    info(
        &state,
        &repo_id(&org, &name)?,
        "main",
        flag(q.blobs.as_deref()),
    )
    .await
}

/// `GET /api/models/{org}/{name}/revision/{revision}` (the revision is one encoded segment).
pub async fn revision_info(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<InfoQuery>,
) -> Result<HttpResponse> {
    let model = repo_of(&req)?;
    let rev = paths::decode_revision(raw_tail(&req, "revision")?.trim_end_matches('/'))?;
    info(&state, &model, &rev, flag(q.blobs.as_deref())).await
}

#[derive(serde::Deserialize)]
pub struct TreeQuery {
    recursive: Option<String>,
    expand: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

/// `GET /api/models/{org}/{name}/tree/{revision}[/{path}]?recursive=&expand=&cursor=`.
pub async fn tree(
    req: HttpRequest,
    state: web::Data<State>,
    q: web::Query<TreeQuery>,
) -> Result<HttpResponse> {
    let model = repo_of(&req)?;
    let tail = raw_tail(&req, "tree")?;
    let (rev_raw, dir_raw) = tail.split_once('/').unwrap_or((tail, ""));
    let rev = paths::decode_revision(rev_raw)?;
    let dir = paths::decode(dir_raw, "path")?
        .trim_matches('/')
        .to_string();
    if !dir.is_empty() {
        paths::validate_file_path(&dir)?;
    }
    let recursive = flag(q.recursive.as_deref());
    let expand = flag(q.expand.as_deref());
    let page = match q.limit.as_deref().map(str::parse::<usize>) {
        None => {
            if expand {
                50
            } else {
                1000
            }
        }
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return Err(Error::invalid_field("limit", "must be 1 to 1000")),
    };
    let offset = match q.cursor.as_deref().map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Err(Error::invalid_field(
                "cursor",
                "not a cursor this server gave out",
            ));
        }
    };

    let (m, r) = (model.clone(), rev.clone());
    let (commit, created, files) = state
        .db
        .read(move |c| {
            catalog::require_model(c, &m)?;
            let commit = catalog::resolve_revision(c, &m, &r)?;
            let created = catalog::revision_created_at(c, &m, &commit)?;
            Ok((
                commit.clone(),
                created,
                catalog::list_files(c, &m, &commit)?,
            ))
        })
        .await?;
    let entries = tree_entries(&files, &commit, &dir, recursive);
    if entries.is_empty() && !dir.is_empty() {
        return Err(Error::not_found(
            "entry_not_found",
            format!("{dir} does not exist in revision {rev} of model {model}."),
        )
        .hub(HubCode::EntryNotFound)
        .with_header(header::HeaderName::from_static("x-repo-commit"), commit));
    }
    let last_commit =
        json!({"id": commit, "title": "weightgate import", "date": util::rfc3339(created)});
    let body: Vec<Value> = entries
        .iter()
        .skip(offset)
        .take(page)
        .map(|e| {
            let mut v = e.clone();
            if expand {
                v["lastCommit"] = last_commit.clone();
            }
            v
        })
        .collect();
    let mut resp = HttpResponse::Ok();
    if offset.saturating_add(page) < entries.len() {
        let mut next = format!(
            "{}/api/models/{model}/tree/{}",
            state.settings.public_url(),
            utf8_percent_encode(&rev, paths::SEGMENT)
        );
        if !dir.is_empty() {
            next.push('/');
            next.push_str(&utf8_percent_encode(&dir, paths::SEGMENT).to_string());
        }
        next.push_str(&format!(
            "?recursive={recursive}&expand={expand}&limit={page}&cursor={}",
            offset.saturating_add(page)
        ));
        resp.insert_header((header::LINK, format!("<{next}>; rel=\"next\"")));
    }
    state
        .audit
        .log(
            crate::audit::Event::new("tree_read", "ok")
                .model(&model)
                .detail(json!({
                    "revision": rev, "commit": commit, "path": dir, "recursive": recursive,
                    "cursor": offset, "client": req.peer_addr().map(|a| a.ip().to_string()),
                })),
        )
        .await;
    Ok(resp.json(body))
}

/// Files and directories under `dir` (all of them, or only its direct children).
fn tree_entries(files: &[FileRow], commit: &str, dir: &str, recursive: bool) -> Vec<Value> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut dirs = BTreeSet::new();
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f.path.starts_with(&prefix)) {
        let rest = &f.path[prefix.len()..];
        // Every directory between `dir` and the file.
        let mut at = 0;
        while let Some(i) = rest[at..].find('/') {
            dirs.insert(format!("{prefix}{}", &rest[..at + i]));
            if !recursive {
                break;
            }
            at += i + 1;
        }
        if recursive || !rest.contains('/') {
            out.push(json!({
                "type": "file",
                "oid": f.git_oid,
                "size": f.size,
                "path": f.path,
                "lfs": lfs_entry(f, "oid"),
            }));
        }
    }
    for d in dirs {
        let oid = hex::encode(Sha1::digest(format!("tree\0{commit}\0{d}").as_bytes()));
        out.push(json!({"type": "directory", "oid": oid, "size": 0, "path": d}));
    }
    out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    out
}

/// `GET /api/agent-harnesses`: the client's telemetry probe, answered with an empty registry
/// (which also stops it asking again).
pub async fn agent_harnesses() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=86400"))
        .json(json!({"standardEnvVars": [], "harnesses": {}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> FileRow {
        FileRow {
            model_id: "o/m".into(),
            commit_sha: "c".into(),
            path: path.into(),
            size: 1,
            sha256: "s".into(),
            git_oid: "g".into(),
        }
    }

    #[test]
    fn tree_listing() {
        let files = vec![file("a.bin"), file("t/v.txt"), file("t/deep/x.bin")];
        let paths = |v: Vec<Value>| {
            v.iter()
                .map(|e| {
                    format!(
                        "{}:{}",
                        e["type"].as_str().unwrap(),
                        e["path"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            paths(tree_entries(&files, "c", "", false)),
            ["file:a.bin", "directory:t"]
        );
        assert_eq!(
            paths(tree_entries(&files, "c", "", true)),
            [
                "file:a.bin",
                "directory:t",
                "directory:t/deep",
                "file:t/deep/x.bin",
                "file:t/v.txt"
            ]
        );
        assert_eq!(
            paths(tree_entries(&files, "c", "t", false)),
            ["directory:t/deep", "file:t/v.txt"]
        );
        assert!(tree_entries(&files, "c", "nope", true).is_empty());
        assert!(
            tree_entries(&files, "c", "", true)
                .iter()
                .all(|e| e.get("xetHash").is_none())
        );
    }
}
