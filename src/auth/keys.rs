//! Ed25519 signing keys kept in `<data_dir>/keys/`, one JSON file per key id. The newest
//! unretired key signs; every unretired key verifies. The folder is read again when a token
//! names a key id this process has not seen (another process may have rotated).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

use crate::util;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    kid: String,
    alg: String,
    created_at: i64,
    retired_at: Option<i64>,
    /// PKCS#8 document, base64.
    private_pkcs8: String,
}

/// A key as `keys list` shows it (times in Unix seconds).
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub created_at: i64,
    pub retired_at: Option<i64>,
    /// Whether it signs new tokens now.
    pub signing: bool,
}

/// A verification key as published in the JWKS.
#[derive(Clone)]
pub struct PublicKey {
    pub kid: String,
    /// Raw 32-byte Ed25519 public key.
    pub raw: Vec<u8>,
    pub decoding: DecodingKey,
}

struct Loaded {
    signing: Option<(String, EncodingKey)>,
    public: HashMap<String, PublicKey>,
    /// The folder's modification time when it was read (keys are written by rename, which
    /// changes it).
    dir_mtime: Option<std::time::SystemTime>,
}

#[derive(Clone)]
pub struct Keyring {
    dir: PathBuf,
    inner: Arc<RwLock<Loaded>>,
}

impl Keyring {
    /// Loads the keys, creating the first one if the folder has none.
    pub fn open(data_dir: &Path) -> anyhow::Result<Keyring> {
        let dir = data_dir.join("keys");
        std::fs::create_dir_all(&dir)?;
        let ring = Keyring {
            dir,
            inner: Arc::new(RwLock::new(Loaded {
                signing: None,
                public: HashMap::new(),
                dir_mtime: None,
            })),
        };
        ring.reload()?;
        if ring.signing().is_none() {
            ring.generate()?;
            ring.reload()?;
        }
        Ok(ring)
    }

    fn read_files(&self) -> anyhow::Result<Vec<KeyFile>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let kf: KeyFile = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a weightgate key file: {e}", path.display())
            })?;
            out.push(kf);
        }
        out.sort_by_key(|k| (k.created_at, k.kid.clone()));
        Ok(out)
    }

    /// Re-reads the folder.
    pub fn reload(&self) -> anyhow::Result<()> {
        let dir_mtime = self.dir_mtime();
        let files = self.read_files()?;
        let mut public = HashMap::new();
        let mut signing = None;
        for kf in files
            .iter()
            .filter(|k| k.retired_at.is_none() && k.alg == "EdDSA")
        {
            let der = STANDARD.decode(&kf.private_pkcs8)?;
            let pair = Ed25519KeyPair::from_pkcs8(&der)
                .map_err(|_| anyhow::anyhow!("key {}: unreadable PKCS#8", kf.kid))?;
            let raw = pair.public_key().as_ref().to_vec();
            public.insert(
                kf.kid.clone(),
                PublicKey {
                    kid: kf.kid.clone(),
                    decoding: DecodingKey::from_ed_der(&raw),
                    raw,
                },
            );
            signing = Some((kf.kid.clone(), EncodingKey::from_ed_der(&der)));
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *inner = Loaded {
            signing,
            public,
            dir_mtime,
        };
        Ok(())
    }

    /// Creates a new signing key; it signs from the next reload on. Returns its kid.
    pub fn generate(&self) -> anyhow::Result<String> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("could not generate an Ed25519 key"))?;
        let kid = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%d"),
            util::random_hex(4)
        );
        let kf = KeyFile {
            kid: kid.clone(),
            alg: "EdDSA".into(),
            created_at: util::now_ms(),
            retired_at: None,
            private_pkcs8: STANDARD.encode(doc.as_ref()),
        };
        let tmp = self.dir.join(format!(".{kid}.tmp"));
        write_private(&tmp, serde_json::to_string_pretty(&kf)?.as_bytes())?;
        std::fs::rename(&tmp, self.dir.join(format!("{kid}.json")))?;
        Ok(kid)
    }

    /// Every key on disk, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<KeyInfo>> {
        let signing = self.signing().map(|(k, _)| k);
        Ok(self
            .read_files()?
            .into_iter()
            .map(|k| KeyInfo {
                signing: signing.as_deref() == Some(k.kid.as_str()),
                created_at: k.created_at / 1000,
                retired_at: k.retired_at.map(|r| r / 1000),
                kid: k.kid,
            })
            .collect())
    }

    /// Retires a key: it stops verifying (here at once, elsewhere within the reload period).
    /// The last unretired key cannot be retired.
    pub fn retire(&self, kid: &str) -> anyhow::Result<()> {
        let files = self.read_files()?;
        let live = files.iter().filter(|k| k.retired_at.is_none()).count();
        let mut kf = files
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| anyhow::anyhow!("no key {kid}"))?;
        if kf.retired_at.is_some() {
            anyhow::bail!("key {kid} is already retired");
        }
        if live <= 1 {
            anyhow::bail!("key {kid} is the only live key; rotate first");
        }
        kf.retired_at = Some(util::now_ms());
        let tmp = self.dir.join(format!(".{kid}.retire.tmp"));
        write_private(&tmp, serde_json::to_string_pretty(&kf)?.as_bytes())?;
        std::fs::rename(&tmp, self.dir.join(format!("{kid}.json")))?;
        self.reload()
    }

    /// The key id and key that sign new tokens.
    pub fn signing(&self) -> Option<(String, EncodingKey)> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .signing
            .clone()
    }

    fn dir_mtime(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok()
    }

    /// The verification key for `kid`; when unknown, re-reads the folder if it changed since
    /// it was read (one `stat`, so a made-up kid costs no more than that).
    pub fn public(&self, kid: &str) -> Option<PublicKey> {
        let stale = {
            let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = inner.public.get(kid) {
                return Some(k.clone());
            }
            self.dir_mtime() != inner.dir_mtime
        };
        if stale && self.reload().is_ok() {
            return self
                .inner
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .public
                .get(kid)
                .cloned();
        }
        None
    }

    /// The JSON Web Key Set of every key that still verifies.
    pub fn jwks(&self) -> serde_json::Value {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<&PublicKey> = inner.public.values().collect();
        keys.sort_by(|a, b| a.kid.cmp(&b.kid));
        serde_json::json!({
            "keys": keys.iter().map(|k| serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": k.kid, "x": URL_SAFE_NO_PAD.encode(&k.raw),
            })).collect::<Vec<_>>()
        })
    }
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}
