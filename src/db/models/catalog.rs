//! Models, revisions, refs, files and the content-addressed blobs behind them.

use diesel::prelude::*;

use crate::db::AnyConnection;
use crate::db::schema::{blobs, files, models, refs, revisions};
use crate::error::{Error, HubCode, Result};

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = models)]
pub struct Model {
    pub id: String,
    pub description: String,
    pub license: String,
    pub gating: String,
    pub allowed_domains: String,
    pub country_allow: String,
    pub country_deny: String,
    pub questions: String,
    pub allow_reapply: bool,
    pub notify: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Model {
    pub fn allowed_domains(&self) -> Vec<String> {
        serde_json::from_str(&self.allowed_domains).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = blobs)]
pub struct Blob {
    pub sha256: String,
    pub size: i64,
    pub block_size: i64,
    pub block_algo: String,
    pub block_hashes: Vec<u8>,
    pub storage_key: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub created_at: i64,
    pub verified_at: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = files)]
pub struct FileRow {
    pub model_id: String,
    pub commit_sha: String,
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub git_oid: String,
}

pub const BLOB_OK: &str = "ok";
pub const BLOB_QUARANTINED: &str = "quarantined";

pub fn find_model(conn: &mut AnyConnection, id: &str) -> Result<Option<Model>> {
    Ok(models::table
        .find(id)
        .select(Model::as_select())
        .first(conn)
        .optional()?)
}

/// The model, or the Hub's `RepoNotFound`.
pub fn require_model(conn: &mut AnyConnection, id: &str) -> Result<Model> {
    find_model(conn, id)?.ok_or_else(|| {
        Error::not_found(
            "repo_not_found",
            format!("Model {id} does not exist on this server."),
        )
        .hub(HubCode::RepoNotFound)
    })
}

pub fn list_models(conn: &mut AnyConnection) -> Result<Vec<Model>> {
    Ok(models::table
        .order(models::id.asc())
        .select(Model::as_select())
        .load(conn)?)
}

pub fn insert_model(conn: &mut AnyConnection, m: &Model) -> Result<()> {
    crate::db::epoch::catalog_changed();
    diesel::insert_into(models::table).values(m).execute(conn)?;
    Ok(())
}

pub fn set_gating(conn: &mut AnyConnection, id: &str, gating: &str, now: i64) -> Result<()> {
    crate::db::epoch::catalog_changed();
    diesel::update(models::table.find(id))
        .set((models::gating.eq(gating), models::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

pub fn ref_commit(conn: &mut AnyConnection, model: &str, name: &str) -> Result<Option<String>> {
    Ok(refs::table
        .find((model, name))
        .select(refs::commit_sha)
        .first(conn)
        .optional()?)
}

pub fn set_ref(
    conn: &mut AnyConnection,
    model: &str,
    name: &str,
    commit: &str,
    now: i64,
) -> Result<()> {
    crate::db::epoch::catalog_changed();
    let updated = diesel::update(refs::table.find((model, name)))
        .set((refs::commit_sha.eq(commit), refs::updated_at.eq(now)))
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(refs::table)
            .values((
                refs::model_id.eq(model),
                refs::name.eq(name),
                refs::commit_sha.eq(commit),
                refs::updated_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(())
}

pub fn revision_exists(conn: &mut AnyConnection, model: &str, commit: &str) -> Result<bool> {
    let n: i64 = revisions::table
        .filter(
            revisions::model_id
                .eq(model)
                .and(revisions::commit_sha.eq(commit)),
        )
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}

/// When a revision was created, for the Hub's `lastModified`.
pub fn revision_created_at(conn: &mut AnyConnection, model: &str, commit: &str) -> Result<i64> {
    Ok(revisions::table
        .find((model, commit))
        .select(revisions::created_at)
        .first(conn)?)
}

pub fn insert_revision(
    conn: &mut AnyConnection,
    model: &str,
    commit: &str,
    now: i64,
) -> Result<()> {
    crate::db::epoch::catalog_changed();
    diesel::insert_into(revisions::table)
        .values((
            revisions::model_id.eq(model),
            revisions::commit_sha.eq(commit),
            revisions::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Resolves a branch name or a full 40-hex commit id to a commit of this model.
pub fn resolve_revision(conn: &mut AnyConnection, model: &str, rev: &str) -> Result<String> {
    if let Some(commit) = ref_commit(conn, model, rev)? {
        return Ok(commit);
    }
    if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        let lower = rev.to_ascii_lowercase();
        if revision_exists(conn, model, &lower)? {
            return Ok(lower);
        }
    }
    Err(Error::not_found(
        "revision_not_found",
        format!("Revision {rev} does not exist for model {model}."),
    )
    .hub(HubCode::RevisionNotFound))
}

pub fn insert_files(conn: &mut AnyConnection, rows: &[FileRow]) -> Result<()> {
    crate::db::epoch::catalog_changed();
    // MultiConnection has no multi-row INSERT; rows go one by one inside the caller's transaction.
    for row in rows {
        diesel::insert_into(files::table)
            .values(row)
            .execute(conn)?;
    }
    Ok(())
}

pub fn list_files(conn: &mut AnyConnection, model: &str, commit: &str) -> Result<Vec<FileRow>> {
    Ok(files::table
        .filter(files::model_id.eq(model).and(files::commit_sha.eq(commit)))
        .order(files::path.asc())
        .select(FileRow::as_select())
        .load(conn)?)
}

/// A file of a revision together with its blob (size, manifest, status).
pub fn find_file(
    conn: &mut AnyConnection,
    model: &str,
    commit: &str,
    path: &str,
) -> Result<Option<(FileRow, Blob)>> {
    Ok(files::table
        .inner_join(blobs::table.on(blobs::sha256.eq(files::sha256)))
        .filter(files::model_id.eq(model))
        .filter(files::commit_sha.eq(commit))
        .filter(files::path.eq(path))
        .select((FileRow::as_select(), Blob::as_select()))
        .first(conn)
        .optional()?)
}

pub fn find_blob(conn: &mut AnyConnection, sha256: &str) -> Result<Option<Blob>> {
    Ok(blobs::table
        .find(sha256)
        .select(Blob::as_select())
        .first(conn)
        .optional()?)
}

/// The packed CVs of a blob's 128 KiB pieces (`storage::manifest::PIECE_SIZE`), empty when
/// none were recorded. Kept out of `Blob`: they are 1/4096 of the file's size, and only
/// streams need them (through `storage::verify::PieceCache`).
pub fn blob_pieces(conn: &mut AnyConnection, sha256: &str) -> Result<Vec<u8>> {
    Ok(blobs::table
        .find(sha256)
        .select(blobs::piece_hashes)
        .first(conn)
        .optional()?
        .unwrap_or_default())
}

/// Inserts a blob with its piece CVs, or replaces an existing row for the same content (a
/// re-import).
pub fn upsert_blob(conn: &mut AnyConnection, blob: &Blob, pieces: &[u8]) -> Result<()> {
    crate::db::epoch::catalog_changed();
    let n = diesel::update(blobs::table.find(&blob.sha256))
        .set((
            blobs::size.eq(blob.size),
            blobs::block_size.eq(blob.block_size),
            blobs::block_algo.eq(&blob.block_algo),
            blobs::block_hashes.eq(&blob.block_hashes),
            blobs::storage_key.eq(&blob.storage_key),
            blobs::status.eq(&blob.status),
            blobs::status_reason.eq(&blob.status_reason),
            blobs::verified_at.eq(blob.verified_at),
            blobs::piece_hashes.eq(pieces),
        ))
        .execute(conn)?;
    if n == 0 {
        diesel::insert_into(blobs::table)
            .values((blob, blobs::piece_hashes.eq(pieces)))
            .execute(conn)?;
    }
    Ok(())
}

/// Marks a blob quarantined; returns false when it already was (so callers report once).
pub fn quarantine_blob(conn: &mut AnyConnection, sha256: &str, reason: &str) -> Result<bool> {
    crate::db::epoch::catalog_changed();
    let n = diesel::update(
        blobs::table
            .find(sha256)
            .filter(blobs::status.ne(BLOB_QUARANTINED)),
    )
    .set((
        blobs::status.eq(BLOB_QUARANTINED),
        blobs::status_reason.eq(reason),
    ))
    .execute(conn)?;
    Ok(n > 0)
}

/// Clears a quarantine after a re-import or an admin's decision.
pub fn clear_quarantine(conn: &mut AnyConnection, sha256: &str, now: i64) -> Result<()> {
    crate::db::epoch::catalog_changed();
    diesel::update(blobs::table.find(sha256))
        .set((
            blobs::status.eq(BLOB_OK),
            blobs::status_reason.eq(None::<String>),
            blobs::verified_at.eq(Some(now)),
        ))
        .execute(conn)?;
    Ok(())
}

/// Every blob (or those one model uses), each with one `(model, path)` that refers to it.
pub fn blobs_for(
    conn: &mut AnyConnection,
    model: Option<&str>,
) -> Result<Vec<(Blob, (String, String))>> {
    let mut q = files::table
        .inner_join(blobs::table.on(blobs::sha256.eq(files::sha256)))
        .select((Blob::as_select(), (files::model_id, files::path)))
        .order((
            blobs::sha256.asc(),
            files::model_id.asc(),
            files::path.asc(),
        ))
        .into_boxed();
    if let Some(m) = model {
        q = q.filter(files::model_id.eq(m.to_string()));
    }
    let mut rows: Vec<(Blob, (String, String))> = q.load(conn)?;
    rows.dedup_by(|a, b| a.0.sha256 == b.0.sha256);
    Ok(rows)
}

pub fn mark_verified(conn: &mut AnyConnection, sha256: &str, now: i64) -> Result<()> {
    diesel::update(blobs::table.find(sha256))
        .set(blobs::verified_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

/// Every file of a revision with its blob, in path order.
pub fn files_with_blobs(
    conn: &mut AnyConnection,
    model: &str,
    commit: &str,
) -> Result<Vec<(FileRow, Blob)>> {
    Ok(files::table
        .inner_join(blobs::table.on(blobs::sha256.eq(files::sha256)))
        .filter(files::model_id.eq(model))
        .filter(files::commit_sha.eq(commit))
        .order(files::path.asc())
        .select((FileRow::as_select(), Blob::as_select()))
        .load(conn)?)
}

/// One of a model's custom application questions.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub label: String,
    /// text | long_text | select | checkbox | date | country
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub required: bool,
}

fn default_kind() -> String {
    "text".into()
}

pub const QUESTION_KINDS: [&str; 6] =
    ["text", "long_text", "select", "checkbox", "date", "country"];

impl Model {
    pub fn questions(&self) -> Vec<Question> {
        serde_json::from_str(&self.questions).unwrap_or_default()
    }

    pub fn country_allow(&self) -> Vec<String> {
        serde_json::from_str(&self.country_allow).unwrap_or_default()
    }

    pub fn country_deny(&self) -> Vec<String> {
        serde_json::from_str(&self.country_deny).unwrap_or_default()
    }
}

/// The settings an administrator edits.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub gating: String,
    pub allowed_domains: Vec<String>,
    pub country_allow: Vec<String>,
    pub country_deny: Vec<String>,
    pub questions: Vec<Question>,
    pub description: String,
    pub license: String,
    pub allow_reapply: bool,
    pub notify: String,
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

pub fn update_settings(
    conn: &mut AnyConnection,
    id: &str,
    s: &ModelSettings,
    now: i64,
) -> Result<()> {
    crate::db::epoch::catalog_changed();
    diesel::update(models::table.find(id))
        .set((
            models::gating.eq(&s.gating),
            models::allowed_domains.eq(to_json(&s.allowed_domains)),
            models::country_allow.eq(to_json(&s.country_allow)),
            models::country_deny.eq(to_json(&s.country_deny)),
            models::questions.eq(to_json(&s.questions)),
            models::description.eq(&s.description),
            models::license.eq(&s.license),
            models::allow_reapply.eq(s.allow_reapply),
            models::notify.eq(&s.notify),
            models::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}
