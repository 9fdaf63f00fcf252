//! Weight storage: an `object_store` backend addressed by typed keys, the block manifests
//! computed at import, and the verifying reader that checks every block before it is sent.

pub mod budget;
pub mod import;
pub mod manifest;
pub mod shared;
pub mod small;
pub mod upstream;
pub mod verify;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;

use crate::config::{Settings, StorageBackend};

/// The configured object store, shared by every request.
#[derive(Clone)]
pub struct Store {
    pub inner: Arc<dyn ObjectStore>,
    /// The origin files are pulled through from (storage.backend = "upstream").
    pub upstream: Option<Arc<upstream::Upstream>>,
    /// For stores on local disk: the folder keys are relative to, read directly on the
    /// download path (one handle per stream, no zero-filled buffers).
    pub local_root: Option<std::path::PathBuf>,
    /// Verified blocks currently held by streams, shared with concurrent streams.
    pub blocks: Arc<shared::Blocks>,
    /// Copies of small local files, verified when read and used while the file on disk is
    /// unchanged; keeps nothing for stores without a local folder.
    pub small: Arc<small::SmallFiles>,
}

/// The small-file cache for local stores (`storage.small_file_cache` bytes).
fn small_files(settings: &Settings) -> Arc<small::SmallFiles> {
    Arc::new(small::SmallFiles::new(
        settings.storage.small_file_cache,
        small::SETTLE,
    ))
}

impl Store {
    pub fn open(settings: &Settings) -> anyhow::Result<Store> {
        match settings.storage.backend {
            StorageBackend::Local => {
                let dir = settings.data_dir.join("storage");
                std::fs::create_dir_all(&dir)?;
                let fs = LocalFileSystem::new_with_prefix(&dir)?;
                Ok(Store {
                    inner: Arc::new(fs),
                    upstream: None,
                    local_root: Some(dir),
                    blocks: Default::default(),
                    small: small_files(settings),
                })
            }
            StorageBackend::S3 => {
                let s = &settings.storage;
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s.s3_bucket)
                    .with_region(&s.s3_region)
                    .with_virtual_hosted_style_request(!s.s3_path_style);
                if !s.s3_endpoint.is_empty() {
                    b = b
                        .with_endpoint(&s.s3_endpoint)
                        .with_allow_http(s.s3_endpoint.starts_with("http://"));
                }
                if !s.s3_access_key_id.is_empty() {
                    b = b
                        .with_access_key_id(&s.s3_access_key_id)
                        .with_secret_access_key(&s.s3_secret_access_key.0);
                }
                let s3 = b
                    .build()
                    .map_err(|e| anyhow::anyhow!("storage.s3_*: {e}"))?;
                Ok(Store {
                    inner: Arc::new(s3),
                    upstream: None,
                    local_root: None,
                    blocks: Default::default(),
                    small: Default::default(),
                })
            }
            StorageBackend::Upstream => {
                // The cache is a local folder; the origin is read through `upstream`.
                let dir = settings.data_dir.join("storage");
                std::fs::create_dir_all(&dir)?;
                let fs = LocalFileSystem::new_with_prefix(&dir)?;
                let up = upstream::Upstream::new(&settings.storage)?;
                Ok(Store {
                    inner: Arc::new(fs),
                    upstream: Some(Arc::new(up)),
                    local_root: Some(dir),
                    blocks: Default::default(),
                    small: small_files(settings),
                })
            }
        }
    }

    /// Where the bytes with this SHA-256 live: content-addressed, so identical files in
    /// different revisions or models are stored once.
    pub fn blob_key(sha256: &str) -> String {
        format!("blobs/sha256/{}/{}", &sha256[..2], sha256)
    }

    pub fn path(key: &str) -> StorePath {
        StorePath::from(key)
    }
}
