//! `weightgate download`, `apply` and `status` against a real server: whole revisions and
//! selections, resume after `kill -9` without re-fetching verified blocks, a distinct exit
//! code for each refusal with nothing written, and a lying server caught block by block.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    Backend, SMALL_BLOCKS, TestServer, application, approved, approved_token, pseudo_random,
    sample_files, server_with_model, write_model_dir,
};
use serde_json::{Value, json};

fn wg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap()
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

async fn downloads_and_verifies(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let dir = s.dir.path().join("dl");
    let out = wg(&[
        "download",
        "acme/tiny",
        "--endpoint",
        &s.base,
        "--token",
        &token,
        "--dir",
        dir.to_str().unwrap(),
        "--parallel",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 3);
    for (path, bytes) in sample_files() {
        assert_eq!(std::fs::read(dir.join(path)).unwrap(), bytes, "{path}");
    }
    assert_eq!(
        files_in(&dir),
        [
            "SHA256SUMS",
            "config.json",
            "model.safetensors",
            "tokenizer/vocab é+1.txt"
        ],
        "no partial state left behind"
    );
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(check.status.success());

    // A second run checks and skips everything.
    let again = wg(&[
        "download",
        "acme/tiny",
        "--endpoint",
        &s.base,
        "--token",
        &token,
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    let r: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (r["skipped"].as_u64(), r["blocks_fetched"].as_u64()),
        (Some(3), Some(0))
    );

    // Selections, with the token from the environment.
    let sel = s.dir.path().join("sel");
    let out = Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .args([
            "download",
            "acme/tiny",
            "--endpoint",
            &s.base,
            "--dir",
            sel.to_str().unwrap(),
            "--include",
            "*.json",
            "--include",
            "tokenizer/**",
            "--exclude",
            "tokenizer/*",
        ])
        .env_clear()
        .env("HF_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files_in(&sel), ["SHA256SUMS", "config.json"]);
}

async fn refusals_have_their_own_exit_codes_and_write_nothing(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let src = s.dir.path().join("src2");
    write_model_dir(&src, &[("x.bin", b"x".to_vec())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/other",
        "--from",
        src.to_str().unwrap(),
    ]);
    let good = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let bob = approved_token(&s, "acme/other", "bob@example.org").await;
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("bob@example.org"))
        .send()
        .await
        .unwrap();
    let bob_app = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.http
        .get(s.confirmation_link("bob@example.org", "acme/tiny").await)
        .send()
        .await
        .unwrap();
    let revoked = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
    ]);
    s.cli_ok(&["tokens", "revoke", revoked["jti"].as_str().unwrap()]);
    let quota = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
        "--max-downloads",
        "1",
    ]);
    let keys = weightgate::auth::keys::Keyring::open(&s.data_dir()).unwrap();
    let now = weightgate::util::now();
    let expired = weightgate::auth::tokens::sign(
        &keys,
        &weightgate::auth::tokens::Claims {
            iss: s.settings.issuer(),
            aud: "weightgate".into(),
            sub: "x".into(),
            iat: now - 7200,
            nbf: now - 7200,
            exp: now - 3600,
            jti: "old".into(),
            models: vec!["acme/tiny".into()],
            max_downloads: None,
        },
    )
    .unwrap()
    .0;

    let run = |token: &str, repo: &str, name: &str| {
        let dir = s.dir.path().join(name);
        let out = wg(&[
            "download",
            repo,
            "--endpoint",
            &s.base,
            "--token",
            token,
            "--dir",
            dir.to_str().unwrap(),
            "--parallel",
            "1",
        ]);
        let finals: Vec<String> = files_in(&dir)
            .into_iter()
            .filter(|f| !f.starts_with(".weightgate"))
            .collect();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            finals,
        )
    };
    let (code, err, files) = run("", "acme/tiny", "none");
    assert_eq!(code, Some(3), "{err}");
    assert!(files.is_empty(), "{files:?}");
    assert_eq!(run(&bob, "acme/tiny", "pending").0, Some(4));
    s.cli_ok(&[
        "applications",
        "reject",
        &bob_app,
        "--reason",
        "Not eligible",
    ]);
    let (code, err, _) = run(&bob, "acme/tiny", "rejected");
    assert_eq!(code, Some(5));
    assert!(
        err.contains("Not eligible") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(run(&expired, "acme/tiny", "expired").0, Some(6));
    assert_eq!(
        run(revoked["token"].as_str().unwrap(), "acme/tiny", "revoked").0,
        Some(7)
    );
    let (code, _, files) = run(quota["token"].as_str().unwrap(), "acme/tiny", "quota");
    assert_eq!(code, Some(8));
    assert!(
        files.len() <= 1 && !files.contains(&"SHA256SUMS".to_string()),
        "only a complete, verified file may be there: {files:?}"
    );
    assert_eq!(run(&good, "acme/ghost", "ghost").0, Some(10));
    // A quarantined file on the server.
    let big = &sample_files()[0].1;
    let sha = weightgate::util::sha256_hex(big);
    let stored = s
        .data_dir()
        .join("storage")
        .join(format!("blobs/sha256/{}/{sha}", &sha[..2]));
    let mut bad = big.clone();
    bad[10] ^= 1;
    std::fs::write(&stored, bad).unwrap();
    let (code, err, files) = run(&good, "acme/tiny", "integrity");
    assert_eq!(code, Some(9), "{err}");
    assert!(!files.contains(&"model.safetensors".to_string()));
}

on_both_backends!(
    downloads_and_verifies,
    refusals_have_their_own_exit_codes_and_write_nothing
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_download_resumes_from_its_verified_blocks() {
    let s = TestServer::start_with(Backend::Sqlite, SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    let big = pseudo_random(48 << 20, 11);
    write_model_dir(&src, &[("weights.bin", big.clone())]);
    s.cli_ok(&["models", "add", "acme/big", "--from", src.to_str().unwrap()]);
    let token = approved_token(&s, "acme/big", "ada@example.org").await;
    let dir = s.dir.path().join("dl");
    let sha = weightgate::util::sha256_hex(&big);
    let map = dir
        .join(".weightgate/partial")
        .join(format!("{sha}.blocks"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .args([
            "download",
            "acme/big",
            "--endpoint",
            &s.base,
            "--token",
            &token,
            "--dir",
            dir.to_str().unwrap(),
            "--parallel",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let total = (48u64 << 20).div_ceil(65536) as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = std::fs::read(&map)
            .map(|b| b.iter().filter(|c| **c == b'1').count())
            .unwrap_or(0);
        if done >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "the download ended before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(2)); // poll interval while watching the block map
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let verified = std::fs::read(&map)
        .unwrap()
        .iter()
        .filter(|c| **c == b'1')
        .count();
    assert!(verified < total, "interrupted before the end");
    assert!(
        !dir.join("weights.bin").exists(),
        "no unverified file in place"
    );

    let out = wg(&[
        "download",
        "acme/big",
        "--endpoint",
        &s.base,
        "--token",
        &token,
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fetched = report["blocks_fetched"].as_u64().unwrap() as usize;
    // At most the block being written when the process died is fetched again.
    assert!(
        fetched <= total - verified + 1 && fetched >= total - verified - 1,
        "fetched {fetched}, {verified} of {total} were verified"
    );
    assert_eq!(
        weightgate::util::sha256_hex(std::fs::read(dir.join("weights.bin")).unwrap()),
        sha
    );
}

/// The manifest of model `o/m` with one 1000-byte file `w.bin` of `data`, whose `sha256` and
/// `block_size` fields are given as they are (to test hostile values).
fn one_file_manifest(data: &[u8], sha256: &Value, block_size: &Value) -> Value {
    json!({"model": "o/m", "revision": "main", "commit": "c".repeat(40), "files": [{
        "path": "w.bin", "size": 1000, "sha256": sha256, "block_size": block_size,
        "block_algo": "blake3", "block_hashes": [blake3::hash(data).to_hex().to_string()]}]})
}

/// `weightgate download o/m` from `base` into `dir`, off the async threads.
async fn download_from(base: String, dir: std::path::PathBuf) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        wg(&[
            "download",
            "o/m",
            "--endpoint",
            &base,
            "--token",
            "t",
            "--dir",
            dir.to_str().unwrap(),
        ])
    })
    .await
    .unwrap()
}

/// A stand-in server for model `o/m`: answers the manifest request with `manifest` and every
/// other request with `status` and `body` (as bytes 0-999 of 1000), counting those.
async fn fake_server(
    manifest: Value,
    status: &'static str,
    body: Vec<u8>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let others = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = others.clone();
    let manifest = manifest.to_string();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (m, body, counter) = (manifest.clone(), body.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let (status, body) = if req.starts_with("GET /api/v1/models/o/m/manifest") {
                    ("200 OK", m.into_bytes())
                } else {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (status, body)
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes 0-999/1000\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    (base, others)
}

/// A server that serves a manifest and then wrong bytes: the client fetches the bad block
/// twice, then gives up naming the file, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_server_is_caught_block_by_block() {
    let data = vec![7u8; 1000];
    let sha = weightgate::util::sha256_hex(&data);
    let manifest = one_file_manifest(&data, &json!(sha), &json!(65536));
    let (base, hits) = fake_server(manifest, "206 Partial Content", vec![8u8; 1000]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = download_from(base, dir.path().join("dl")).await;
    assert_eq!(out.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&out.stderr).contains("w.bin"));
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "fetched once more, then given up"
    );
    assert!(!dir.path().join("dl/w.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_and_status_from_the_terminal() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let out = wg(&[
        "apply",
        "acme/tiny",
        "--endpoint",
        &s.base,
        "--email",
        "ada@example.org",
        "--name",
        "Ada",
        "--affiliation",
        "Engines",
        "--country",
        "GB",
        "--intended-use",
        "evaluation",
        "--answer",
        "Team size=3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let link = v["status_url"].as_str().unwrap().to_string();
    let st = wg(&["status", "--link", &link, "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&st.stdout).unwrap()["status"],
        "unverified"
    );
    s.http
        .get(s.confirmation_link("ada@example.org", "acme/tiny").await)
        .send()
        .await
        .unwrap();
    let st = wg(&["status", "--endpoint", &s.base, "--link", &link]);
    assert!(String::from_utf8_lossy(&st.stdout).contains("acme/tiny: pending"));
    let bad = wg(&[
        "apply",
        "acme/tiny",
        "--endpoint",
        &s.base,
        "--email",
        "not-an-email",
        "--name",
        "Eve",
        "--affiliation",
        "X",
        "--country",
        "FR",
        "--intended-use",
        "y",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("email"));
    let _ = approved;
}

/// A manifest whose SHA-256 is a path (it names the partial file on disk) or whose block
/// size would not fit in memory is refused before anything is fetched or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_manifest_writes_nothing_outside_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let victim = root.path().join("victim.txt");
    std::fs::write(&victim, b"keep me").unwrap();
    let data = vec![7u8; 1000];
    let hostile = [
        (victim.to_str().unwrap().to_string(), 65536u64),
        ("../../victim.txt".to_string(), 65536),
        (weightgate::util::sha256_hex(&data), 1 << 40),
    ];
    for (sha, block_size) in hostile {
        let manifest = one_file_manifest(&data, &json!(sha), &json!(block_size));
        let (base, fetches) = fake_server(manifest, "500 Internal Server Error", Vec::new()).await;
        let dl = root.path().join("a/b/dl");
        let out = download_from(base, dl.clone()).await;
        assert_eq!(out.status.code(), Some(9), "{sha} {block_size}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("w.bin"));
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(!dl.join("w.bin").exists());
    }
}

/// Two paths with the same bytes (copies, empty files) share one partial download; each
/// still ends up in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_the_same_content_each_get_their_copy() {
    let s = TestServer::start_with(Backend::Sqlite, SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    let shared = pseudo_random(200_000, 5);
    let files = [
        ("a.bin", shared.clone()),
        ("copy/a.bin", shared.clone()),
        ("empty1", Vec::new()),
        ("sub/empty2", Vec::new()),
    ];
    write_model_dir(&src, &files);
    s.cli_ok(&["models", "add", "acme/dup", "--from", src.to_str().unwrap()]);
    let token = approved_token(&s, "acme/dup", "ada@example.org").await;
    let dir = s.dir.path().join("dl");
    let out = tokio::task::spawn_blocking({
        let (base, d) = (s.base.clone(), dir.clone());
        move || {
            wg(&[
                "download",
                "acme/dup",
                "--endpoint",
                &base,
                "--token",
                &token,
                "--dir",
                d.to_str().unwrap(),
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(path)).unwrap(), bytes, "{path}");
    }
}
