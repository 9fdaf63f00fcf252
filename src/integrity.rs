//! What happens when stored bytes are wrong: quarantine (with its audit event and the admins'
//! mail, in one transaction), and the scrub that re-verifies stored files on demand or on a
//! schedule, quarantining what fails and lifting the quarantine of what verifies again.

use serde_json::json;

use crate::audit::{self, Event};
use crate::db::models::catalog::{self, BLOB_OK, BLOB_QUARANTINED, Blob};
use crate::db::{AnyConnection, Db};
use crate::error::Result;
use crate::storage::Store;
use crate::storage::verify::{self, Failure, Plan};
use crate::{mail, util};

/// Quarantines a blob inside the caller's transaction; the first time only, writes the
/// `integrity_failure` event and queues mail to the admins. Returns whether it was new.
pub fn quarantine_in(
    c: &mut AnyConnection,
    admins: &[String],
    model: &str,
    path: &str,
    sha256: &str,
    problem: &str,
) -> Result<bool> {
    if !catalog::quarantine_blob(c, sha256, problem)? {
        return Ok(false);
    }
    audit::append(
        c,
        &[Event::new("integrity_failure", "quarantined")
            .model(model)
            .detail(json!({"path": path, "sha256": sha256, "problem": problem}))],
    )?;
    let msg = mail::templates::integrity_failure(model, path, sha256, problem);
    for admin in admins {
        mail::queue(c, admin, &msg)?;
    }
    Ok(true)
}

/// Reads a whole blob through the verifying reader and checks its SHA-256 too.
pub async fn check_blob(store: &Store, blob: &Blob, chunk_size: usize) -> Result<(), Failure> {
    let size = blob.size as u64;
    let plan = Plan {
        key: blob.storage_key.clone(),
        size,
        block_size: blob.block_size as u64,
        block_hashes: blob.block_hashes.clone(),
        // A scrub reads everything anyway: whole blocks, without loading the piece CVs.
        piece_hashes: Default::default(),
        range: 0..size,
        chunk_size,
        share: false,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut chunks = verify::stream(store.clone(), plan, move |f| {
        let _ = tx.send(f);
        std::future::ready(())
    });
    let mut sha = util::Sha256::new();
    while let Some(piece) = chunks.rx.recv().await {
        match piece {
            Ok(b) => sha.update(&b),
            Err(_) => break,
        }
    }
    if let Ok(failure) = rx.await {
        return Err(failure);
    }
    if hex::encode(sha.finish()) != blob.sha256 {
        return Err(Failure::Mismatch { block: u64::MAX });
    }
    Ok(())
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ScrubReport {
    pub checked: usize,
    pub ok: usize,
    /// Newly quarantined `(sha256, problem)`.
    pub quarantined: Vec<(String, String)>,
    /// Quarantined blobs that verified again and were released.
    pub restored: Vec<String>,
    /// Blobs that could not be read (left as they were).
    pub unreadable: Vec<(String, String)>,
}

/// Re-verifies every stored blob (or those of one model).
pub async fn scrub(
    db: &Db,
    store: &Store,
    admins: &[String],
    model: Option<&str>,
    chunk_size: usize,
) -> Result<ScrubReport> {
    let m = model.map(str::to_string);
    let blobs = db
        .read(move |c| catalog::blobs_for(c, m.as_deref()))
        .await?;
    let mut report = ScrubReport::default();
    for (blob, (model_id, path)) in blobs {
        report.checked += 1;
        match check_blob(store, &blob, chunk_size).await {
            Ok(()) => {
                report.ok += 1;
                if blob.status == BLOB_QUARANTINED {
                    let sha = blob.sha256.clone();
                    let (m, p) = (model_id.clone(), path.clone());
                    db.write(move |c| {
                        catalog::clear_quarantine(c, &sha, util::now())?;
                        audit::append(
                            c,
                            &[Event::new("quarantine_cleared", "ok")
                                .actor("scrub")
                                .model(&m)
                                .detail(json!({"path": p, "sha256": sha}))],
                        )
                    })
                    .await?;
                    report.restored.push(blob.sha256.clone());
                } else {
                    let sha = blob.sha256.clone();
                    db.write(move |c| catalog::mark_verified(c, &sha, util::now()))
                        .await?;
                }
            }
            Err(Failure::Unreadable(e)) => report.unreadable.push((blob.sha256.clone(), e)),
            Err(failure) => {
                let problem = match failure {
                    Failure::Mismatch { block: u64::MAX } => {
                        "every block matches but the whole-file SHA-256 does not".to_string()
                    }
                    other => other.describe(),
                };
                if blob.status == BLOB_OK {
                    let (admins, sha, p) = (admins.to_vec(), blob.sha256.clone(), problem.clone());
                    db.write(move |c| quarantine_in(c, &admins, &model_id, &path, &sha, &p))
                        .await?;
                    report.quarantined.push((blob.sha256.clone(), problem));
                }
            }
        }
    }
    let summary = json!({
        "model": model, "checked": report.checked, "ok": report.ok,
        "quarantined": report.quarantined.len(), "restored": report.restored.len(),
        "unreadable": report.unreadable.len(),
    });
    db.write(move |c| {
        audit::append(
            c,
            &[Event::new("scrub_completed", "ok")
                .actor("scrub")
                .detail(summary)],
        )
    })
    .await?;
    Ok(report)
}
