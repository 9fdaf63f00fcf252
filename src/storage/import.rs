//! `models add`: read a folder once, hashing every file while copying it into storage,
//! then record a revision whose commit id is derived from the manifest.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::json;

use super::Store;
use super::manifest::{self, BLOCK_ALGO, Digest};
use crate::audit::{self, Event};
use crate::db::Db;
use crate::db::models::catalog::{self, BLOB_OK, Blob, FileRow, Model};
use crate::error::{Error, Result};
use crate::{paths, util};

/// What `models add` asks for.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub repo_id: String,
    pub dir: PathBuf,
    pub revision: String,
    pub gating: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub block_size: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub model: String,
    pub revision: String,
    pub commit: String,
    /// False when the content equals the revision's current content.
    pub changed: bool,
    pub files: Vec<ImportedFile>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportedFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Publishers' checksum files: verified when present, and not imported as content
/// (each revision publishes its own `SHA256SUMS`).
const CHECKSUM_FILE: &str = "SHA256SUMS";

pub async fn import(db: &Db, store: &Store, req: ImportRequest) -> Result<ImportReport> {
    paths::validate_repo_id(&req.repo_id)?;
    paths::validate_ref_name(&req.revision)?;
    if let Some(g) = &req.gating {
        validate_gating(g)?;
    }
    if !req.dir.is_dir() {
        return Err(Error::bad_request(
            "bad_source",
            format!("--from {}: not a folder", req.dir.display()),
        ));
    }
    let dir = req.dir.clone();
    let found = tokio::task::spawn_blocking(move || list_files(&dir))
        .await
        .map_err(Error::internal)??;
    let published_sums = match std::fs::read_to_string(req.dir.join(CHECKSUM_FILE)) {
        Ok(text) => Some(parse_sha256sums(&text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::bad_request(
                "bad_source",
                format!("{CHECKSUM_FILE}: {e}"),
            ));
        }
    };

    // Everything is copied under temporary keys first; nothing becomes visible (blob rows,
    // final keys, the revision) until every file is hashed and the publisher's sums agree.
    let mut digests = Vec::with_capacity(found.len());
    let mut staged = Vec::with_capacity(found.len());
    let mut outcome = Ok(());
    for (rel, abs) in &found {
        match stage_file(store, abs, req.block_size).await {
            Ok((digest, tmp)) => {
                digests.push((rel.clone(), digest));
                staged.push(tmp);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if let (Ok(()), Some(sums)) = (&outcome, &published_sums) {
        outcome = check_published_sums(sums, &digests);
    }
    if let Ok(()) = outcome {
        outcome = promote(db, store, &digests, &staged).await;
    }
    if let Err(e) = outcome {
        for tmp in &staged {
            let _ = store.inner.delete(&Store::path(tmp)).await;
        }
        return Err(e);
    }

    record_revision(db, &req, digests).await
}

/// Records the revision for imported files (all already stored and their blobs recorded):
/// the model if new, a new revision only when the content changed, the ref, the audit event.
async fn record_revision(
    db: &Db,
    req: &ImportRequest,
    digests: Vec<(String, Digest)>,
) -> Result<ImportReport> {
    let req = req.clone();
    let entries: Vec<(String, u64, String)> = digests
        .iter()
        .map(|(p, d)| (p.clone(), d.size, d.sha256.clone()))
        .collect();
    let commit = manifest::commit_id(&req.repo_id, &entries);
    let files: Vec<FileRow> = digests
        .iter()
        .map(|(path, d)| FileRow {
            model_id: req.repo_id.clone(),
            commit_sha: commit.clone(),
            path: path.clone(),
            size: d.size as i64,
            sha256: d.sha256.clone(),
            git_oid: manifest::git_blob_oid(manifest::lfs_pointer(&d.sha256, d.size).as_bytes()),
        })
        .collect();
    let report_files = digests
        .iter()
        .map(|(p, d)| ImportedFile {
            path: p.clone(),
            size: d.size,
            sha256: d.sha256.clone(),
        })
        .collect();

    let r = req.clone();
    let commit2 = commit.clone();
    let changed = db
        .write(move |c| {
            let now = util::now();
            let existing = catalog::find_model(c, &r.repo_id)?;
            match &existing {
                None => catalog::insert_model(c, &Model {
                    id: r.repo_id.clone(),
                    description: r.description.clone().unwrap_or_default(),
                    license: r.license.clone().unwrap_or_default(),
                    gating: r.gating.clone().unwrap_or_else(|| "manual".into()),
                    allowed_domains: "[]".into(),
                    country_allow: "[]".into(),
                    country_deny: "[]".into(),
                    questions: "[]".into(),
                    allow_reapply: true,
                    notify: "each".into(),
                    created_at: now,
                    updated_at: now,
                })?,
                Some(_) => {
                    if let Some(g) = &r.gating {
                        catalog::set_gating(c, &r.repo_id, g, now)?;
                    }
                }
            }
            let current = catalog::ref_commit(c, &r.repo_id, &r.revision)?;
            if current.as_deref() == Some(commit2.as_str()) {
                return Ok(false);
            }
            if !catalog::revision_exists(c, &r.repo_id, &commit2)? {
                catalog::insert_revision(c, &r.repo_id, &commit2, now)?;
                catalog::insert_files(c, &files)?;
            }
            catalog::set_ref(c, &r.repo_id, &r.revision, &commit2, now)?;
            audit::append(c, &[Event::new("model_imported", "ok")
                .actor("cli")
                .model(&r.repo_id)
                .detail(json!({"revision": r.revision, "commit": commit2, "files": files.len(), "created": existing.is_none()}))])?;
            Ok(true)
        })
        .await?;
    Ok(ImportReport {
        model: req.repo_id,
        revision: req.revision,
        commit,
        changed,
        files: report_files,
    })
}

pub fn validate_gating(g: &str) -> Result<()> {
    match g {
        "manual" | "auto" | "domain" => Ok(()),
        _ => Err(Error::invalid_field(
            "gating",
            "must be manual, auto or domain",
        )),
    }
}

/// Every regular file under `dir` (recursively, `.git` excluded), with its repo path.
fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| Error::bad_request("bad_source", format!("{}: {e}", d.display())))?;
        for entry in rd {
            let entry = entry?;
            let ft = entry.file_type()?;
            let abs = entry.path();
            let rel = abs.strip_prefix(dir).map_err(Error::internal)?;
            let rel = rel.to_str().ok_or_else(|| {
                Error::bad_request(
                    "bad_source",
                    format!("{}: file names must be UTF-8", abs.display()),
                )
            })?;
            let rel = rel.replace(std::path::MAIN_SEPARATOR, "/");
            if ft.is_dir() {
                if rel != ".git" {
                    stack.push(abs);
                }
            } else if ft.is_file() {
                if rel == CHECKSUM_FILE {
                    continue;
                }
                paths::validate_file_path(&rel)?;
                out.push((rel, abs));
            } else {
                tracing::warn!(path = %abs.display(), "skipping a symlink or special file");
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies one file into storage under a temporary key while hashing it, in one read.
async fn stage_file(store: &Store, src: &Path, block_size: u64) -> Result<(Digest, String)> {
    let tmp_key = format!("tmp/import-{}", util::random_hex(12));
    let tmp = Store::path(&tmp_key);
    let upload = store.inner.put_multipart(&tmp).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let path = src.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<Digest> {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = manifest::Hasher::new(block_size);
        loop {
            let mut buf = vec![0u8; 4 << 20];
            let n = read_full(&mut file, &mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            if tx.blocking_send(bytes::Bytes::from(buf)).is_err() {
                return Err(std::io::Error::other("upload stopped"));
            }
        }
        Ok(hasher.finish())
    });
    let mut upload_error = None;
    while let Some(piece) = rx.recv().await {
        if let Err(e) = writer.wait_for_capacity(4).await {
            upload_error = Some(e);
            break;
        }
        writer.put(piece);
    }
    drop(rx);
    let read = reader.await.map_err(Error::internal)?;
    let failure = match (upload_error, read) {
        (None, Ok(digest)) => {
            writer.finish().await?;
            return Ok((digest, tmp_key));
        }
        (Some(e), _) => Error::from(e),
        (None, Err(e)) => Error::bad_request("bad_source", format!("{}: {e}", src.display())),
    };
    let _ = writer.abort().await;
    let _ = store.inner.delete(&tmp).await;
    Err(failure)
}

/// Moves staged objects to their content-addressed keys and records their blobs. Content
/// already stored (and not quarantined) keeps its object; the staged copy is dropped.
async fn promote(
    db: &Db,
    store: &Store,
    digests: &[(String, Digest)],
    staged: &[String],
) -> Result<()> {
    for ((_, digest), tmp) in digests.iter().zip(staged) {
        let sha = digest.sha256.clone();
        let existing = db.read(move |c| catalog::find_blob(c, &sha)).await?;
        if existing.as_ref().is_some_and(|b| b.status == BLOB_OK) {
            store.inner.delete(&Store::path(tmp)).await?;
            continue;
        }
        let key = Store::blob_key(&digest.sha256);
        store
            .inner
            .rename(&Store::path(tmp), &Store::path(&key))
            .await?;
        let (blob, pieces) = verified_blob(digest, key);
        // Re-importing quarantined content replaces its bytes and manifest and lifts the quarantine.
        db.write(move |c| catalog::upsert_blob(c, &blob, &pieces))
            .await?;
    }
    Ok(())
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Parses `sha256sum` output: `<64 hex>  <path>` or `<64 hex> *<path>` per line.
pub fn parse_sha256sums(text: &str) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            Error::bad_request(
                "bad_checksums",
                format!(
                    "{CHECKSUM_FILE} line {}: expected \"<sha256>  <path>\"",
                    i + 1
                ),
            )
        };
        let (hash, rest) = line.split_once(' ').ok_or_else(bad)?;
        let path = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(bad)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let path = path.strip_prefix("./").unwrap_or(path);
        out.insert(path.to_string(), hash.to_ascii_lowercase());
    }
    Ok(out)
}

fn check_published_sums(
    sums: &HashMap<String, String>,
    digests: &[(String, Digest)],
) -> Result<()> {
    let have: HashMap<&str, &str> = digests
        .iter()
        .map(|(p, d)| (p.as_str(), d.sha256.as_str()))
        .collect();
    let mut listed: Vec<&String> = sums.keys().collect();
    listed.sort();
    for path in listed {
        match have.get(path.as_str()) {
            None => {
                return Err(Error::bad_request(
                    "checksum_mismatch",
                    format!("{CHECKSUM_FILE} lists {path}, which is not in the folder"),
                ));
            }
            Some(actual) if *actual != sums[path] => {
                return Err(Error::bad_request(
                    "checksum_mismatch",
                    format!(
                        "{path}: SHA-256 is {actual}, {CHECKSUM_FILE} says {}",
                        sums[path]
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `models add ORG/NAME --from-bucket PREFIX`: registers objects already in the configured
/// store under `PREFIX/`, hashing them where they are (they keep their keys; nothing is copied).
pub async fn import_in_place(
    db: &Db,
    store: &Store,
    req: ImportRequest,
    prefix: &str,
) -> Result<ImportReport> {
    use futures_util::StreamExt;
    paths::validate_repo_id(&req.repo_id)?;
    paths::validate_ref_name(&req.revision)?;
    if let Some(g) = &req.gating {
        validate_gating(g)?;
    }
    let prefix = prefix.trim_matches('/').to_string();
    let mut listing = store.inner.list(Some(&Store::path(&prefix)));
    let mut objects = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let key = meta.location.to_string();
        let rel = key
            .strip_prefix(&format!("{prefix}/"))
            .unwrap_or(&key)
            .to_string();
        if rel == CHECKSUM_FILE {
            continue;
        }
        paths::validate_file_path(&rel)?;
        objects.push((rel, key));
    }
    if objects.is_empty() {
        return Err(Error::bad_request(
            "bad_source",
            format!("--from-bucket {prefix}: no objects under this prefix"),
        ));
    }
    objects.sort();
    let mut digests = Vec::with_capacity(objects.len());
    for (rel, key) in objects {
        let mut stream = store.inner.get(&Store::path(&key)).await?.into_stream();
        let mut hasher = manifest::Hasher::new(req.block_size);
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk?);
        }
        let digest = hasher.finish();
        let (blob, pieces) = verified_blob(&digest, key);
        db.write(move |c| match catalog::find_blob(c, &blob.sha256)? {
            Some(existing) if existing.status == BLOB_OK => Ok(()),
            _ => catalog::upsert_blob(c, &blob, &pieces),
        })
        .await?;
        digests.push((rel, digest));
    }
    record_revision(db, &req, digests).await
}

/// `models add ORG/NAME --from-upstream`: records the origin's revision. Files the origin
/// publishes a SHA-256 for become remote blobs, fetched and verified on first download; small
/// files without one are fetched now and stored like an import.
pub async fn import_from_upstream(
    db: &Db,
    store: &Store,
    req: ImportRequest,
) -> Result<ImportReport> {
    use super::upstream::{BLOB_REMOTE, REMOTE_PREFIX};
    paths::validate_repo_id(&req.repo_id)?;
    paths::validate_ref_name(&req.revision)?;
    let up = store.upstream.clone().ok_or_else(|| {
        Error::bad_request(
            "not_upstream",
            "--from-upstream needs storage.backend = \"upstream\"",
        )
    })?;
    let (origin_commit, files) = up.revision(&req.repo_id, &req.revision).await?;
    let mut digests = Vec::with_capacity(files.len());
    for f in files {
        let origin_path = format!(
            "{}/resolve/{origin_commit}/{}",
            req.repo_id,
            paths::encode_path(&f.path)
        );
        match f.sha256 {
            Some(sha) => {
                let sha = sha.to_ascii_lowercase();
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::bad_request(
                        "upstream_garbled",
                        format!("{}: the upstream's SHA-256 is not 64 hex", f.path),
                    ));
                }
                let now = util::now();
                let blob = Blob {
                    sha256: sha.clone(),
                    size: f.size as i64,
                    block_size: req.block_size as i64,
                    block_algo: BLOCK_ALGO.into(),
                    block_hashes: Vec::new(),
                    storage_key: format!("{REMOTE_PREFIX}{origin_path}"),
                    status: BLOB_REMOTE.into(),
                    status_reason: None,
                    created_at: now,
                    verified_at: None,
                };
                db.write(move |c| match catalog::find_blob(c, &blob.sha256)? {
                    Some(_) => Ok(()),
                    None => catalog::upsert_blob(c, &blob, &[]),
                })
                .await?;
                digests.push((
                    f.path,
                    Digest {
                        size: f.size,
                        sha256: sha,
                        block_size: req.block_size,
                        block_hashes: Vec::new(),
                        piece_hashes: Vec::new(),
                    },
                ));
            }
            None => {
                let bytes = up.fetch_small(&origin_path, 64 << 20).await?;
                let mut h = manifest::Hasher::new(req.block_size);
                h.update(&bytes);
                let digest = h.finish();
                let key = Store::blob_key(&digest.sha256);
                store.inner.put(&Store::path(&key), bytes.into()).await?;
                let (blob, pieces) = verified_blob(&digest, key);
                db.write(move |c| catalog::upsert_blob(c, &blob, &pieces))
                    .await?;
                digests.push((f.path, digest));
            }
        }
    }
    record_revision(db, &req, digests).await
}

/// The row of content just hashed and stored under `key` (verified now), with its piece CVs
/// for `catalog::upsert_blob`.
pub fn verified_blob(digest: &Digest, key: String) -> (Blob, Vec<u8>) {
    let now = util::now();
    let blob = Blob {
        sha256: digest.sha256.clone(),
        size: digest.size as i64,
        block_size: digest.block_size as i64,
        block_algo: BLOCK_ALGO.into(),
        block_hashes: digest.block_hashes.clone(),
        storage_key: key,
        status: BLOB_OK.into(),
        status_reason: None,
        created_at: now,
        verified_at: Some(now),
    };
    (blob, digest.piece_hashes.clone())
}
