//! Test harness: a real server on 127.0.0.1:0 over a fresh SQLite file or a fresh
//! PostgreSQL database, the real `weightgate` binary for CLI steps, and helpers to read the
//! mail the server wrote.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use tempfile::TempDir;
use tokio::sync::oneshot;
use weightgate::config::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs one async test body once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::common::Backend::Postgres).await
            }
        }
    )*};
}

/// The server PostgreSQL answers on; `.ci/run` makes sure it is up.
pub fn pg_admin_url() -> String {
    std::env::var("WEIGHTGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
}

impl TestDb {
    pub fn new(backend: Backend, dir: &Path) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.join("weightgate.db").display()),
                pg_name: None,
            },
            Backend::Postgres => {
                let name = format!("wg_test_{}", weightgate::util::random_hex(8));
                let admin = pg_admin_url();
                let mut conn = PgConnection::establish(&admin).unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not answering ({e}); run .ci/run or set WEIGHTGATE_TEST_PG"));
                conn.batch_execute(&format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                let base = admin
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_string())
                    .unwrap_or(admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name
            && let Ok(mut conn) = PgConnection::establish(&pg_admin_url())
        {
            let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

pub struct TestServer {
    pub base: String,
    pub dir: TempDir,
    pub db: TestDb,
    pub settings: Settings,
    pub http: reqwest::Client,
    /// The extra `WEIGHTGATE__…` settings, passed to CLI runs too.
    extra: Vec<(String, String)>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, &[]).await
    }

    /// Starts a server; `extra` are more `WEIGHTGATE__…` settings.
    pub async fn start_with(backend: Backend, extra: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = TestDb::new(backend, dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let base = format!("http://{addr}");
        let mut env = vec![
            (
                "WEIGHTGATE__DATA_DIR".to_string(),
                dir.path().join("data").display().to_string(),
            ),
            ("WEIGHTGATE__DATABASE__URL".to_string(), db.url.clone()),
            ("WEIGHTGATE__SERVER__BIND".to_string(), addr.to_string()),
            ("WEIGHTGATE__SERVER__PUBLIC_URL".to_string(), base.clone()),
            ("WEIGHTGATE__SERVER__WORKERS".to_string(), "2".to_string()),
            (
                "WEIGHTGATE__DATABASE__POOL_SIZE".to_string(),
                "4".to_string(),
            ),
        ];
        let extra: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(extra.iter().cloned());
        let settings = Settings::load_from(None, env).expect("settings");
        let (tx, rx) = oneshot::channel::<()>();
        let s = settings.clone();
        let task = tokio::spawn(async move {
            weightgate::run(s, listener, async move {
                let _ = rx.await;
            })
            .await
        });
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let server = TestServer {
            base,
            dir,
            db,
            settings,
            http,
            extra,
            stop: Some(tx),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    /// A second server on the same database (a replica), with its own port and data dir.
    pub async fn replica(&self) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let base = format!("http://{addr}");
        let mut settings = self.settings.clone();
        settings.data_dir = dir.path().join("data");
        // A replica shares the signing keys and the storage; its data dir is its own.
        std::fs::create_dir_all(settings.data_dir.join("keys")).expect("keys dir");
        for e in std::fs::read_dir(self.data_dir().join("keys"))
            .expect("keys")
            .flatten()
        {
            std::fs::copy(e.path(), settings.data_dir.join("keys").join(e.file_name()))
                .expect("copy key");
        }
        std::os::unix::fs::symlink(
            self.data_dir().join("storage"),
            settings.data_dir.join("storage"),
        )
        .expect("share storage");
        settings.server.bind = addr.to_string();
        // Replicas stand behind one public URL (the load balancer's): the same token issuer.
        let (tx, rx) = oneshot::channel::<()>();
        let s = settings.clone();
        let task = tokio::spawn(async move {
            weightgate::run(s, listener, async move {
                let _ = rx.await;
            })
            .await
        });
        let db = TestDb {
            url: self.db.url.clone(),
            pg_name: None,
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let server = TestServer {
            base,
            dir,
            db,
            settings,
            http,
            extra: self.extra.clone(),
            stop: Some(tx),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of the readiness wait
        }
    }

    /// Asks the server to shut down without waiting for it (SIGTERM, as it were).
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server gracefully (draining the audit queue).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.settings.data_dir.clone()
    }

    /// Runs the real binary with this server's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_weightgate"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WEIGHTGATE__DATA_DIR", self.data_dir())
            .env("WEIGHTGATE__DATABASE__URL", &self.db.url)
            .env("WEIGHTGATE__SERVER__PUBLIC_URL", &self.base)
            .envs(self.extra.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run weightgate")
    }

    /// Runs the binary and insists on success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "weightgate {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.cli_ok(&all)).expect("JSON output")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits until at least `n` messages sit in the file-transport outbox; returns them decoded.
    pub async fn wait_mail(&self, n: usize) -> Vec<Mail> {
        let dir = self.data_dir().join("outbox");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mails = read_mails(&dir);
            if mails.len() >= n {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} mails, found {}",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await; // poll interval while waiting for the outbox worker
        }
    }

    /// Waits for a message that satisfies `pred` (mail is delivered by a background worker).
    pub async fn wait_for_mail(&self, what: &str, pred: impl Fn(&Mail) -> bool) -> Mail {
        let dir = self.data_dir().join("outbox");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(m) = read_mails(&dir).into_iter().find(|m| pred(m)) {
                return m;
            }
            assert!(Instant::now() < deadline, "no mail: {what}");
            tokio::time::sleep(Duration::from_millis(25)).await; // poll interval while waiting for the outbox worker
        }
    }

    /// The confirmation link sent to `email` for `model`.
    pub async fn confirmation_link(&self, email: &str, model: &str) -> String {
        let prefix = format!("{}/applications/confirm?code=", self.base);
        let m = self
            .wait_for_mail(&format!("confirmation for {email}"), |m| {
                m.header("To").as_deref() == Some(email)
                    && m.header("Subject")
                        .is_some_and(|s| s.contains("Confirm") && s.contains(model))
            })
            .await;
        m.link(&prefix).expect("a confirmation link")
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = self.http.get(self.url("/metrics")).send().await;
        r.expect("GET /metrics").text().await.expect("metrics text")
    }

    /// Every audit event, via `weightgate audit export`.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.cli_ok(&["audit", "export", "--format", "jsonl"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("jsonl line"))
            .collect()
    }

    /// The log's `file_download` events for files named `path`, in chain order.
    pub fn downloads_of(&self, path: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| e["kind"] == "file_download" && e["detail"]["path"] == path)
            .collect()
    }

    /// Polls the audit log until an event matches `pred` (download events are written by
    /// the batching writer just after the response ends).
    pub async fn wait_audit(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.audit().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(Instant::now() < deadline, "no audit event: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval while waiting for the audit writer
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A message from the file transport, with quoted-printable undone.
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: String,
    pub text: String,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next()?;
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The first link in the message that starts with `prefix`.
    pub fn link(&self, prefix: &str) -> Option<String> {
        let at = self.text.find(prefix)?;
        let rest = &self.text[at..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '"' || c == '<')
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    }
}

fn read_mails(dir: &Path) -> Vec<Mail> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .map(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                e.path(),
            )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|(_, p)| std::fs::read_to_string(p).ok())
        // The file transport writes in place: skip a message still being written (every
        // message is multipart and ends with its closing boundary).
        .filter(|raw| raw.trim_end().ends_with("--"))
        .map(|raw| Mail {
            text: decode_qp(&raw),
            raw,
        })
        .collect()
}

/// Undoes quoted-printable soft line breaks and `=XX` escapes.
pub fn decode_qp(s: &str) -> String {
    let s = s.replace("=\r\n", "").replace("=\n", "");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A folder of model files: `(relative path, bytes)`.
pub fn write_model_dir(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, bytes).expect("write");
    }
}

/// Deterministic pseudo-random bytes (so a failure is reproducible).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends one raw HTTP/1.1 request (so paths reach the server exactly as written, without a
/// client's normalisation) and returns the status code and the whole response text.
pub async fn raw_request(
    base: &str,
    request_line_path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let mut req =
        format!("GET {request_line_path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A model with a multi-block file (block size 64 KiB in these tests), a small file and a
/// nested name that needs percent-encoding.
pub fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", pseudo_random(300_000, 1)),
        ("config.json", br#"{"hidden_size": 8}"#.to_vec()),
        ("tokenizer/vocab é+1.txt", b"a\nb\nc\n".to_vec()),
    ]
}

pub const SMALL_BLOCKS: &[(&str, &str)] = &[
    ("WEIGHTGATE__STORAGE__BLOCK_SIZE", "65536"),
    ("WEIGHTGATE__STORAGE__CHUNK_SIZE", "16384"),
];

pub async fn server_with_model(backend: Backend, model: &str) -> TestServer {
    server_with_model_and(backend, model, &[]).await
}

/// `server_with_model`, with more settings on top of `SMALL_BLOCKS`.
pub async fn server_with_model_and(
    backend: Backend,
    model: &str,
    extra: &[(&str, &str)],
) -> TestServer {
    let mut envs = SMALL_BLOCKS.to_vec();
    envs.extend_from_slice(extra);
    let s = TestServer::start_with(backend, &envs).await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&["models", "add", model, "--from", src.to_str().unwrap()]);
    s
}

/// Issues (on the CLI) a token for an approved researcher limited to `files` downloads.
pub fn quota_token(s: &TestServer, email: &str, model: &str, files: u32) -> String {
    let n = files.to_string();
    s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        email,
        "--model",
        model,
        "--max-downloads",
        &n,
    ])["token"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn application(email: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "Ada Lovelace", "email": email, "affiliation": "Analytical Engines",
        "country": "GB", "intended_use": "Evaluating tokenizer robustness.", "accept_license": true,
        "answers": {"Team size": "3"}
    })
}

/// Applies, confirms through the emailed link, approves on the CLI and issues a token.
pub async fn approved_token(s: &TestServer, model: &str, email: &str) -> String {
    approved(s, model, email).await.0
}

/// Applies, confirms through the emailed link, approves on the CLI and issues a token;
/// returns the token and the application's status URL.
pub async fn approved(s: &TestServer, model: &str, email: &str) -> (String, String) {
    let (org, name) = model.split_once('/').unwrap();
    let r = s
        .http
        .post(s.url(&format!("/api/v1/models/{org}/{name}/applications")))
        .json(&application(email))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    let confirm = s
        .confirmation_link(&email.to_ascii_lowercase(), model)
        .await;
    let r = s.http.get(&confirm).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.cli_ok(&["applications", "approve", &id]);
    let token = s
        .cli_ok(&["tokens", "issue", "--email", email, "--model", model])
        .trim()
        .to_string();
    (token, body["status_url"].as_str().unwrap().to_string())
}

/// GETs `url` with `token` until the answer has `status` (e.g. a revocation made by another
/// process reaching the server's token cache); gives up after 15 s.
pub async fn eventually(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    status: u16,
) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        if r.status().as_u16() == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after 15 s, expected {status}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval until the cache refreshes
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The project's virtualenv Python (made by scripts/test.sh).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var("WEIGHTGATE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "no virtualenv at {}: run scripts/test.sh",
        venv.display()
    );
    py
}

/// A helper process from tests/helpers, killed when dropped.
pub struct Helper(pub std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tests/helpers/<script>` with `args` and waits for it to print "ready".
pub fn start_helper(script: &str, args: &[&str]) -> Helper {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(venv_python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/helpers")
                .join(script),
        )
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start helper");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("helper output");
    assert_eq!(line.trim(), "ready", "{script} did not start");
    Helper(child)
}

/// A direct connection to a test's SQLite file that waits for the server's writes.
pub fn sqlite(url: &str) -> diesel::SqliteConnection {
    let mut c =
        diesel::SqliteConnection::establish(url.trim_start_matches("sqlite://")).expect("sqlite");
    c.batch_execute("PRAGMA busy_timeout = 10000")
        .expect("busy_timeout");
    c
}

/// Creates the administrator root@example.org (password on stdin, as an operator would) and
/// returns an API token for it.
pub fn admin_token(s: &TestServer) -> String {
    use std::io::Write;
    let mut p = Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .args(["admin", "create", "--email", "root@example.org"])
        .env_clear()
        .env("WEIGHTGATE__DATA_DIR", s.data_dir())
        .env("WEIGHTGATE__DATABASE__URL", &s.db.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("weightgate admin create");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(b"a long admin password\n")
        .expect("password");
    assert!(p.wait().expect("wait").success(), "admin create failed");
    s.cli_json(&["admin", "token", "create", "--email", "root@example.org"])["token"]
        .as_str()
        .expect("token")
        .to_string()
}
