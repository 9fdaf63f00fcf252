//! Settings: built-in defaults, then an optional TOML file, then `WEIGHTGATE__SECTION__KEY`
//! environment variables. Validated once at start; a bad value is one line naming its key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A string that never shows up in `Debug` output or logs.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

/// Serialised only to list keys (the configuration drift test); never reveals the value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"<redacted>\"")
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub storage: StorageSettings,
    pub mail: MailSettings,
    pub tokens: TokenSettings,
    pub audit: AuditSettings,
    pub integrity: IntegritySettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// When a download's last bytes may leave (`audit.acknowledge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acknowledge {
    /// Once its final event is committed: no completed download is missing from the log
    /// after a crash.
    Commit,
    /// Once its final event is queued for the writer, as HEADs and denials are (taking room
    /// in `audit.queue_max`), for a higher request rate: a crash can lose the final events
    /// not yet committed, normally the last batch (milliseconds), at most `queue_max`.
    Queue,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// "text" for people, "json" (one object a line, with the request id) for log pipelines.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// How long an administrator's login lasts, e.g. "12h".
    pub session_ttl: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            session_ttl: "12h".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub bind: String,
    /// Base URL used in emails and pages; `http://<bind>` when empty.
    pub public_url: String,
    /// Number of HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// On SIGTERM, seconds in-flight requests (downloads) get to finish before they are cut.
    pub shutdown_timeout_secs: u64,
    /// On SIGTERM, seconds `/readyz` answers 503 (so load balancers stop sending) before the
    /// listener closes.
    pub drain_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://…`; `sqlite://<data_dir>/weightgate.db` when empty.
    pub url: Secret,
    pub pool_size: u32,
    /// Seconds to wait for a pooled connection before answering 503.
    pub pool_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Local,
    S3,
    Upstream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub backend: StorageBackend,
    /// Block size of new manifests, in bytes (every byte is checked against its block's BLAKE3
    /// before it is sent).
    pub block_size: u64,
    /// Most bytes read, verified and written to the socket at a time. 512 KiB: a lone stream
    /// ran faster than with 1 MiB (the read, hash and copy stay in the CPU's cache) and as
    /// fast as with 2 MiB; 256 KiB loses to per-chunk overhead.
    pub chunk_size: usize,
    /// Bytes of small local files (up to 64 KiB each) kept in memory, verified when read, to
    /// save a read and hash per request (0: none). A copy is used while an `fstat` of its
    /// file finds the metadata unchanged and the file still linked, and for at most a minute
    /// (`storage::small`).
    pub small_file_cache: usize,
    /// S3-compatible storage (storage.backend = "s3").
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_region: String,
    pub s3_access_key_id: String,
    pub s3_secret_access_key: Secret,
    /// Path-style URLs (`endpoint/bucket/key`), as MinIO and most self-hosted servers want.
    pub s3_path_style: bool,
    /// Hub-compatible origin pulled through on first request (storage.backend = "upstream").
    pub upstream_url: String,
    /// Bearer token sent to the upstream (e.g. a Hugging Face token); never to clients.
    pub upstream_token: Secret,
    /// Seconds the upstream may stay silent mid-transfer before the fill is abandoned.
    pub upstream_idle_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTransport {
    File,
    Smtp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailSettings {
    pub transport: MailTransport,
    pub from: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: SmtpTls,
    pub smtp_username: String,
    pub smtp_password: Secret,
    pub admin_emails: Vec<String>,
    /// Seconds before the first retry of a failed delivery (mail and webhooks); doubles each time.
    pub retry_base_secs: u64,
    /// How often expiry warnings and the daily digest are checked, e.g. "10m".
    pub notices_interval: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// `iss` of issued tokens; the public URL when empty.
    pub issuer: String,
    /// `aud` of issued tokens and the only audience accepted.
    pub audience: String,
    /// Lifetime of a token when none is asked for, e.g. "7d".
    pub default_ttl: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Seconds a verified token is trusted before it is checked again; how late a revocation
    /// made by another process or replica can take effect (0 checks every request).
    pub revocation_refresh_secs: u64,
    /// Lifetime of a signed link when none is asked for, e.g. "1h".
    pub link_ttl: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegritySettings {
    /// How often `serve` re-verifies every stored file, e.g. "24h"; "off" disables it.
    pub scrub_interval: String,
}

impl Default for IntegritySettings {
    fn default() -> Self {
        IntegritySettings {
            scrub_interval: "24h".into(),
        }
    }
}

impl IntegritySettings {
    /// The scrub period, or `None` when scheduled scrubs are off.
    pub fn scrub_every(&self) -> Option<std::time::Duration> {
        if self.scrub_interval.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            crate::util::parse_duration(&self.scrub_interval).ok()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Most download events committed in one transaction by the batching writer.
    pub batch_max: usize,
    /// Most events from requests that are logged without holding their response (HEADs,
    /// denials, 304s, tree and manifest reads, minted links; with `acknowledge = "queue"`,
    /// downloads too) waiting for the writer at a time; further such requests wait for room,
    /// so a flood of them slows down rather than filling memory.
    pub queue_max: usize,
    /// When a download's last bytes may leave: once its final event is committed
    /// ("commit"), or once it is queued ("queue").
    pub acknowledge: Acknowledge,
    /// Seconds a download's last bytes wait for that before the download fails instead
    /// (a single-chunk download is answered 503); 0 waits as long as it takes.
    pub ack_timeout_secs: u64,
    /// How often `serve` records the chain's head as a checkpoint, e.g. "1h"; "off" disables.
    pub checkpoint_interval: String,
    /// File that checkpoints are appended to (one JSON line each); empty for none.
    pub checkpoint_file: String,
    /// URL that checkpoints are POSTed to as JSON; empty for none.
    pub checkpoint_url: String,
    /// Whether file downloads and HEADs are written to the audit log. Off only to measure
    /// what auditing costs (bench/); token quotas are still counted when it is off.
    pub downloads: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./data"),
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            storage: StorageSettings::default(),
            mail: MailSettings::default(),
            tokens: TokenSettings::default(),
            audit: AuditSettings::default(),
            integrity: IntegritySettings::default(),
            admin: AdminSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            bind: "127.0.0.1:8080".into(),
            public_url: String::new(),
            workers: 0,
            shutdown_timeout_secs: 30,
            drain_secs: 0,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: Secret::default(),
            pool_size: 16,
            pool_timeout_secs: 5,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            backend: StorageBackend::Local,
            block_size: 8 << 20,
            chunk_size: 512 << 10,
            small_file_cache: 16 << 20,
            s3_endpoint: String::new(),
            s3_bucket: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: Secret::default(),
            s3_path_style: true,
            upstream_url: String::new(),
            upstream_token: Secret::default(),
            upstream_idle_secs: 30,
        }
    }
}

impl Default for MailSettings {
    fn default() -> Self {
        MailSettings {
            transport: MailTransport::File,
            from: "weightgate <weightgate@localhost>".into(),
            smtp_host: "127.0.0.1".into(),
            smtp_port: 25,
            smtp_tls: SmtpTls::Starttls,
            smtp_username: String::new(),
            smtp_password: Secret::default(),
            admin_emails: Vec::new(),
            retry_base_secs: 30,
            notices_interval: "10m".into(),
        }
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: String::new(),
            audience: "weightgate".into(),
            default_ttl: "7d".into(),
            leeway_secs: 30,
            revocation_refresh_secs: 5,
            link_ttl: "1h".into(),
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            batch_max: 512,
            queue_max: 65536,
            acknowledge: Acknowledge::Commit,
            ack_timeout_secs: 30,
            checkpoint_interval: "1h".into(),
            checkpoint_file: String::new(),
            checkpoint_url: String::new(),
            downloads: true,
        }
    }
}

/// Where the database lives, decided from `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(key: &str, why: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {why}"))
}

impl Settings {
    /// Loads defaults, then `file` (if given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, vars)
    }

    /// Like [`Settings::load`], with the environment passed in (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "--config {}: no such file",
                    file.display()
                )));
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("WEIGHTGATE__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("WEIGHTGATE")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("mail.admin_emails")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        if !self.server.public_url.is_empty() {
            let url = reqwest::Url::parse(&self.server.public_url)
                .map_err(|e| bad("server.public_url", e))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad(
                    "server.public_url",
                    "must start with http:// or https://",
                ));
            }
        }
        self.database_url()?;
        if self.database.pool_size == 0 {
            return Err(bad("database.pool_size", "must be at least 1"));
        }
        let bs = self.storage.block_size;
        if !(64 << 10..=256 << 20).contains(&bs) {
            return Err(bad(
                "storage.block_size",
                "must be between 65536 and 268435456 bytes",
            ));
        }
        if self.storage.chunk_size < 4096 || self.storage.chunk_size as u64 > bs {
            return Err(bad(
                "storage.chunk_size",
                "must be at least 4096 and at most storage.block_size",
            ));
        }
        match self.storage.backend {
            StorageBackend::Local => {}
            StorageBackend::S3 => {
                if self.storage.s3_bucket.is_empty() {
                    return Err(bad(
                        "storage.s3_bucket",
                        "required when storage.backend = \"s3\"",
                    ));
                }
                if !self.storage.s3_endpoint.is_empty() {
                    reqwest::Url::parse(&self.storage.s3_endpoint)
                        .map_err(|e| bad("storage.s3_endpoint", e))?;
                }
            }
            StorageBackend::Upstream => {
                let u = reqwest::Url::parse(&self.storage.upstream_url)
                    .map_err(|e| bad("storage.upstream_url", e))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(bad("storage.upstream_url", "must be an http(s) URL"));
                }
                if self.storage.upstream_idle_secs == 0 {
                    return Err(bad("storage.upstream_idle_secs", "must be at least 1"));
                }
            }
        }
        if self.mail.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(bad(
                "mail.from",
                "not a valid mailbox, e.g. \"weightgate <gate@example.org>\"",
            ));
        }
        for a in &self.mail.admin_emails {
            if a.parse::<lettre::Address>().is_err() {
                return Err(bad(
                    "mail.admin_emails",
                    format!("{a:?} is not an email address"),
                ));
            }
        }
        if self.mail.transport == MailTransport::Smtp && self.mail.smtp_host.is_empty() {
            return Err(bad(
                "mail.smtp_host",
                "required when mail.transport = \"smtp\"",
            ));
        }
        if self.tokens.audience.is_empty() {
            return Err(bad("tokens.audience", "must not be empty"));
        }
        crate::util::parse_duration(&self.tokens.default_ttl)
            .map_err(|e| bad("tokens.default_ttl", e))?;
        crate::util::parse_duration(&self.tokens.link_ttl)
            .map_err(|e| bad("tokens.link_ttl", e))?;
        if self.tokens.leeway_secs > 300 {
            return Err(bad("tokens.leeway_secs", "at most 300 seconds"));
        }
        if self.tokens.revocation_refresh_secs > 60 {
            return Err(bad("tokens.revocation_refresh_secs", "at most 60 seconds"));
        }
        if !self
            .integrity
            .scrub_interval
            .trim()
            .eq_ignore_ascii_case("off")
        {
            crate::util::parse_duration(&self.integrity.scrub_interval)
                .map_err(|e| bad("integrity.scrub_interval", format!("{e} (or \"off\")")))?;
        }
        if !self
            .audit
            .checkpoint_interval
            .trim()
            .eq_ignore_ascii_case("off")
        {
            crate::util::parse_duration(&self.audit.checkpoint_interval)
                .map_err(|e| bad("audit.checkpoint_interval", format!("{e} (or \"off\")")))?;
        }
        if !self.audit.checkpoint_url.is_empty() {
            let u = reqwest::Url::parse(&self.audit.checkpoint_url)
                .map_err(|e| bad("audit.checkpoint_url", e))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(bad("audit.checkpoint_url", "must be an http(s) URL"));
            }
        }
        crate::util::parse_duration(&self.mail.notices_interval)
            .map_err(|e| bad("mail.notices_interval", e))?;
        crate::util::parse_duration(&self.admin.session_ttl)
            .map_err(|e| bad("admin.session_ttl", e))?;
        if self.audit.batch_max == 0 {
            return Err(bad("audit.batch_max", "must be at least 1"));
        }
        if self.audit.queue_max == 0 {
            return Err(bad("audit.queue_max", "must be at least 1"));
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.bind.parse().map_err(|_| {
            bad(
                "server.bind",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    self.server.bind
                ),
            )
        })
    }

    /// The public base URL without a trailing slash.
    pub fn public_url(&self) -> String {
        if self.server.public_url.is_empty() {
            format!("http://{}", self.server.bind)
        } else {
            self.server.public_url.trim_end_matches('/').to_string()
        }
    }

    pub fn issuer(&self) -> String {
        if self.tokens.issuer.is_empty() {
            self.public_url()
        } else {
            self.tokens.issuer.clone()
        }
    }

    pub fn database_url(&self) -> Result<DatabaseUrl, ConfigError> {
        let url = &self.database.url.0;
        if url.is_empty() {
            return Ok(DatabaseUrl::Sqlite(self.data_dir.join("weightgate.db")));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad("database.url", "sqlite:// needs a file path"));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.clone()));
        }
        Err(bad(
            "database.url",
            "must start with sqlite:// or postgres://",
        ))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let serde_json::Value::Object(m) = v {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_object() {
                    keys(v, &key, out)
                } else {
                    out.push(key)
                }
            }
        }
    }

    #[test]
    fn default_toml_documents_every_key_with_the_code_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let from_file = Settings::load_from(Some(&path), Vec::new()).expect("default.toml loads");
        let code = serde_json::to_value(Settings::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            code,
            "values drifted"
        );
        let raw: serde_json::Value = config::Config::builder()
            .add_source(config::File::from(path.as_path()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        keys(&raw, "", &mut a);
        keys(&code, "", &mut b);
        a.sort();
        b.sort();
        assert_eq!(a, b, "keys drifted");
    }

    #[test]
    fn environment_overrides_and_lists() {
        let s = Settings::load_from(
            None,
            env(&[
                ("WEIGHTGATE__SERVER__BIND", "0.0.0.0:9000"),
                (
                    "WEIGHTGATE__MAIL__ADMIN_EMAILS",
                    "a@example.org,b@example.org",
                ),
                ("WEIGHTGATE__DATABASE__URL", "postgres://u@h/db"),
                ("WEIGHTGATE__DATA_DIR", "/srv/wg"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.bind, "0.0.0.0:9000");
        assert_eq!(s.mail.admin_emails, vec!["a@example.org", "b@example.org"]);
        assert_eq!(
            s.database_url().unwrap(),
            DatabaseUrl::Postgres("postgres://u@h/db".into())
        );
        assert_eq!(s.public_url(), "http://0.0.0.0:9000");
        assert_eq!(
            Settings::default().database_url().unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("./data/weightgate.db"))
        );
    }

    #[test]
    fn bad_values_name_their_key_in_one_line() {
        for (k, v, key) in [
            ("WEIGHTGATE__SERVER__BIND", "localhost", "server.bind"),
            (
                "WEIGHTGATE__SERVER__PUBLIC_URL",
                "ftp://x",
                "server.public_url",
            ),
            ("WEIGHTGATE__SERVER__WORKERS", "many", "workers"),
            ("WEIGHTGATE__DATABASE__URL", "mysql://x", "database.url"),
            (
                "WEIGHTGATE__STORAGE__BLOCK_SIZE",
                "12",
                "storage.block_size",
            ),
            ("WEIGHTGATE__STORAGE__BACKEND", "floppy", "backend"),
            ("WEIGHTGATE__MAIL__TRANSPORT", "pigeon", "transport"),
            (
                "WEIGHTGATE__MAIL__ADMIN_EMAILS",
                "not-an-address",
                "mail.admin_emails",
            ),
            (
                "WEIGHTGATE__TOKENS__DEFAULT_TTL",
                "forever",
                "tokens.default_ttl",
            ),
            ("WEIGHTGATE__SERVER__COLOUR", "blue", "colour"),
            ("WEIGHTGATE__AUDIT__ACKNOWLEDGE", "later", "acknowledge"),
        ] {
            let err = Settings::load_from(None, env(&[(k, v)]))
                .expect_err(k)
                .to_string();
            assert!(err.contains(key), "{k}={v}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Settings::load_from(
            None,
            env(&[
                ("WEIGHTGATE__MAIL__SMTP_PASSWORD", "hunter2"),
                ("WEIGHTGATE__DATABASE__URL", "postgres://u:pw-in-url@h/db"),
            ]),
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw-in-url"),
            "{shown}"
        );
    }
}
