//! Pull-through from a Hub-compatible origin (an internal mirror, or the Hugging Face Hub with
//! a server-side token). `models add --from-upstream` records the origin's files with their
//! SHA-256 (its `lfs.oid`) as *remote* blobs; the first download streams from the origin to
//! the client while filling the cache, and the cached copy is promoted (with its block
//! manifest) only once its SHA-256 matched. The last chunk is held back until then, so a
//! client never receives a complete wrong file. Concurrent first requests fill once.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::Value;
use tokio::sync::mpsc;

use super::Store;
use super::manifest::{self, Digest};
use crate::config::StorageSettings;
use crate::db::Db;
use crate::db::models::catalog::{self, BLOB_OK, Blob};
use crate::error::{Error, Result};
use crate::util;

/// Status of a blob known only by its SHA-256, not cached yet.
pub const BLOB_REMOTE: &str = "remote";
/// Prefix of a remote blob's storage key: the rest is the origin path.
pub const REMOTE_PREFIX: &str = "upstream:";

pub struct Upstream {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    idle: Duration,
    fills: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A file of the origin's revision.
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    /// The SHA-256 the origin publishes (LFS files); `None` for small git files.
    pub sha256: Option<String>,
}

impl Upstream {
    pub fn new(s: &StorageSettings) -> anyhow::Result<Upstream> {
        Ok(Upstream {
            base: s.upstream_url.trim_end_matches('/').to_string(),
            token: (!s.upstream_token.0.is_empty()).then(|| s.upstream_token.0.clone()),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                .redirect(reqwest::redirect::Policy::limited(5))
                .build()?,
            idle: Duration::from_secs(s.upstream_idle_secs),
            fills: Mutex::new(HashMap::new()),
        })
    }

    /// Resolves a `Link: rel="next"` target against the page it came from and keeps it on
    /// the upstream's own origin, so the upstream token is never sent anywhere else.
    fn same_origin(&self, current: &str, next: &str) -> Result<String> {
        let refuse = || {
            Error::unavailable(
                "upstream_refused",
                "The upstream's next-page link points outside the upstream.",
            )
        };
        let base = reqwest::Url::parse(&self.base).map_err(|_| refuse())?;
        let url = reqwest::Url::parse(current)
            .and_then(|c| c.join(next))
            .map_err(|_| refuse())?;
        if url.origin() != base.origin() {
            return Err(refuse());
        }
        Ok(url.to_string())
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.get(url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn json(&self, url: &str) -> Result<(Value, Option<String>)> {
        let r = tokio::time::timeout(self.idle, self.get(url).send())
            .await
            .map_err(|_| {
                Error::unavailable("upstream_stalled", "The upstream did not answer in time.")
            })?
            .map_err(|e| {
                Error::unavailable(
                    "upstream_unreachable",
                    format!("The upstream is unreachable: {e}"),
                )
            })?;
        if !r.status().is_success() {
            return Err(Error::unavailable(
                "upstream_refused",
                format!("The upstream answered {} for {url}", r.status()),
            ));
        }
        let next = r
            .headers()
            .get("link")
            .and_then(|l| l.to_str().ok())
            .and_then(|l| {
                l.split(',')
                    .find(|p| p.contains("rel=\"next\""))
                    .and_then(|p| p.split('<').nth(1))
                    .and_then(|p| p.split('>').next())
                    .map(str::to_string)
            });
        let v = r.json().await.map_err(|e| {
            Error::unavailable(
                "upstream_garbled",
                format!("The upstream's answer is not JSON: {e}"),
            )
        })?;
        Ok((v, next))
    }

    /// The origin's commit for `revision` and its files.
    pub async fn revision(&self, repo: &str, revision: &str) -> Result<(String, Vec<RemoteFile>)> {
        let (info, _) = self
            .json(&format!(
                "{}/api/models/{repo}/revision/{revision}",
                self.base
            ))
            .await?;
        let commit = info["sha"]
            .as_str()
            .filter(|s| s.len() == 40)
            .ok_or_else(|| {
                Error::unavailable("upstream_garbled", "The upstream gave no 40-hex commit.")
            })?
            .to_string();
        let mut url = format!(
            "{}/api/models/{repo}/tree/{commit}?recursive=true&expand=false",
            self.base
        );
        let mut files = Vec::new();
        for _ in 0..1000 {
            let (page, next) = self.json(&url).await?;
            for e in page
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["type"] == "file")
            {
                let path = e["path"].as_str().unwrap_or_default().to_string();
                crate::paths::validate_file_path(&path)?;
                files.push(RemoteFile {
                    path,
                    size: e["size"].as_u64().unwrap_or(0),
                    sha256: e["lfs"]["oid"].as_str().map(str::to_string),
                });
            }
            match next {
                Some(n) => url = self.same_origin(&url, &n)?,
                None => break,
            }
        }
        Ok((commit, files))
    }

    pub fn file_url(&self, origin_path: &str) -> String {
        format!("{}/{origin_path}", self.base)
    }

    /// Downloads a small file whole (files without a published SHA-256 are imported as they are).
    pub async fn fetch_small(&self, origin_path: &str, limit: u64) -> Result<Bytes> {
        let r = self
            .get(&self.file_url(origin_path))
            .send()
            .await
            .map_err(|e| Error::unavailable("upstream_unreachable", e.to_string()))?;
        if !r.status().is_success() {
            return Err(Error::unavailable(
                "upstream_refused",
                format!("The upstream answered {} for {origin_path}", r.status()),
            ));
        }
        let b = r
            .bytes()
            .await
            .map_err(|e| Error::unavailable("upstream_cut", e.to_string()))?;
        if b.len() as u64 > limit {
            return Err(Error::bad_request(
                "upstream_too_large",
                format!("{origin_path} has no published SHA-256 and is larger than {limit} bytes"),
            ));
        }
        Ok(b)
    }

    fn lock_for(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sha256.to_string())
            .or_default()
            .clone()
    }

    /// Fills the cache with a remote blob, streaming its bytes to `tx` as they arrive (when
    /// given). Returns once the blob is cached and recorded, or the fill failed. While one
    /// fill runs, other fills of the same content wait and then find it cached.
    pub async fn fill(
        &self,
        store: &Store,
        db: &Db,
        blob: &Blob,
        block_size: u64,
        tx: Option<mpsc::Sender<io::Result<Bytes>>>,
    ) -> Result<()> {
        let lock = self.lock_for(&blob.sha256);
        let guard = lock.lock().await;
        let sha = blob.sha256.clone();
        let current = db.read(move |c| catalog::find_blob(c, &sha)).await?;
        if let Some(b) = current.filter(|b| b.status == BLOB_OK) {
            // Filled by another request meanwhile: hand on the cached, verified bytes,
            // without holding up the others that waited for the fill.
            drop(guard);
            if let Some(tx) = tx {
                let plan = super::verify::Plan {
                    key: b.storage_key.clone(),
                    size: b.size as u64,
                    block_size: b.block_size as u64,
                    block_hashes: b.block_hashes.clone(),
                    // A rare race (filled meanwhile): whole blocks, no CV lookup.
                    piece_hashes: Default::default(),
                    range: 0..b.size as u64,
                    chunk_size: 1 << 20,
                    share: true,
                };
                let mut chunks =
                    super::verify::stream(store.clone(), plan, |_| std::future::ready(()));
                while let Some(c) = chunks.rx.recv().await {
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
            }
            return Ok(());
        }
        let origin = blob
            .storage_key
            .strip_prefix(REMOTE_PREFIX)
            .unwrap_or(&blob.storage_key)
            .to_string();
        let tmp = Store::path(&format!("tmp/fill-{}", util::random_hex(12)));
        let result = self
            .stream_into(store, &origin, &tmp, blob, block_size, tx.as_ref())
            .await;
        let result = match result {
            Ok((digest, held)) => {
                let key = Store::blob_key(&blob.sha256);
                let promoted: Result<()> = async {
                    store.inner.rename(&tmp, &Store::path(&key)).await?;
                    let (filled, pieces) = super::import::verified_blob(&digest, key);
                    db.write(move |c| catalog::upsert_blob(c, &filled, &pieces))
                        .await?;
                    Ok(())
                }
                .await;
                promoted.map(|()| held)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(held) => {
                drop(guard);
                if let (Some(tx), Some(last)) = (tx, held) {
                    let _ = tx.send(Ok(last)).await;
                }
                Ok(())
            }
            Err(e) => {
                let _ = store.inner.delete(&tmp).await;
                drop(guard);
                tracing::error!(sha256 = %blob.sha256, error = %e.message, "pull-through fill failed; nothing was cached");
                if let Some(tx) = tx {
                    let _ = tx.send(Err(io::Error::other(e.message.clone()))).await;
                }
                Err(e)
            }
        }
    }

    /// Copies the origin's bytes into `tmp` while hashing and forwarding them; the last chunk
    /// is returned instead of forwarded, for the caller to release once the file is promoted.
    async fn stream_into(
        &self,
        store: &Store,
        origin: &str,
        tmp: &object_store::path::Path,
        blob: &Blob,
        block_size: u64,
        tx: Option<&mpsc::Sender<io::Result<Bytes>>>,
    ) -> Result<(Digest, Option<Bytes>)> {
        let size = blob.size as u64;
        let resp = tokio::time::timeout(self.idle, self.get(&self.file_url(origin)).send())
            .await
            .map_err(|_| {
                Error::unavailable(
                    "upstream_stalled",
                    "The upstream did not start sending in time.",
                )
            })?
            .map_err(|e| {
                Error::unavailable(
                    "upstream_unreachable",
                    format!("The upstream is unreachable: {e}"),
                )
            })?;
        if !resp.status().is_success() {
            return Err(Error::unavailable(
                "upstream_refused",
                format!("The upstream answered {}", resp.status()),
            ));
        }
        let mut body = resp.bytes_stream();
        let mut writer =
            WriteMultipart::new_with_chunk_size(store.inner.put_multipart(tmp).await?, 8 << 20);
        let mut hasher = manifest::Hasher::new(block_size);
        let mut got = 0u64;
        let mut pending: Option<Bytes> = None;
        let mut client = tx;
        loop {
            let next = match tokio::time::timeout(self.idle, body.next()).await {
                Ok(n) => n,
                Err(_) => {
                    let _ = writer.abort().await;
                    return Err(Error::unavailable(
                        "upstream_stalled",
                        "The upstream stalled mid-transfer; nothing was cached. Try again.",
                    ));
                }
            };
            let Some(chunk) = next else { break };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(Error::unavailable(
                        "upstream_cut",
                        format!(
                            "The upstream cut the transfer: {e}; nothing was cached. Try again."
                        ),
                    ));
                }
            };
            got += chunk.len() as u64;
            if got > size {
                let _ = writer.abort().await;
                return Err(Error::unavailable(
                    "upstream_wrong",
                    "The upstream sent more bytes than the file has; nothing was cached.",
                ));
            }
            hasher.update(&chunk);
            writer.put(chunk.clone());
            // Forward the previous chunk; keep this one back in case it is the last. A
            // client that stops reading is let go (its transfer ends short) rather than
            // holding up the fill, and everyone waiting for it, indefinitely.
            if let (Some(t), Some(prev)) = (client, pending.replace(chunk)) {
                match tokio::time::timeout(self.idle, t.send(Ok(prev))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => client = None,
                    Err(_) => {
                        tracing::warn!(sha256 = %blob.sha256, "a client stopped reading during a pull-through fill; the fill goes on without it");
                        client = None;
                    }
                }
            }
        }
        let digest = hasher.finish();
        if got != size || digest.sha256 != blob.sha256 {
            let _ = writer.abort().await;
            return Err(Error::unavailable(
                "upstream_wrong",
                format!(
                    "The upstream's bytes do not match the published SHA-256 (got {got} bytes, sha256 {}); nothing was cached.",
                    digest.sha256
                ),
            ));
        }
        writer.finish().await?;
        // A client let go above must not receive the last chunk after a gap.
        Ok((digest, pending.filter(|_| client.is_some())))
    }
}
