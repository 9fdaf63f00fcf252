//! The command line on its own: configuration errors, first start, migrations, and the
//! audit chain's tamper detection, on both backends where a database is involved.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, TestServer, write_model_dir};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

fn weightgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weightgate"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

#[test]
fn bad_configuration_stops_start_up_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, named) in [
        ("WEIGHTGATE__SERVER__BIND", "everywhere", "server.bind"),
        ("WEIGHTGATE__DATABASE__URL", "oracle://db", "database.url"),
        ("WEIGHTGATE__STORAGE__BLOCK_SIZE", "-5", "block_size"),
        ("WEIGHTGATE__AUDIT__QUEUE_MAX", "0", "audit.queue_max"),
        ("WEIGHTGATE__NOT__A_KEY", "1", "not"),
    ] {
        let out = weightgate()
            .args(["serve"])
            .env("WEIGHTGATE__DATA_DIR", dir.path())
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{key}: {err}");
        assert!(err.contains(named), "{key}: {err}");
    }
    let out = weightgate()
        .args(["--config", "/nonexistent/weightgate.toml", "migrate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/weightgate.toml"));
    // Nothing was created by a refused start.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_config_file_is_read_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wg.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\n[tokens]\ndefault_ttl = \"nonsense\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = weightgate()
        .args(["--config", file.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the file's bad value is reported"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens.default_ttl"));
    let out = weightgate()
        .args(["--config", file.to_str().unwrap(), "migrate"])
        .env("WEIGHTGATE__TOKENS__DEFAULT_TTL", "2d")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("d/weightgate.db").is_file(),
        "data_dir came from the file"
    );
}

#[test]
fn serve_on_an_empty_data_dir_says_what_to_do_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = weightgate()
        .args(["serve"])
        .env("WEIGHTGATE__DATA_DIR", dir.path().join("data"))
        .env("WEIGHTGATE__SERVER__BIND", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while !seen.contains("weightgate models add") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("weightgate models add ORG/NAME --from"),
        "{seen}"
    );
    assert!(dir.path().join("data/weightgate.db").is_file());
    assert!(
        std::fs::read_dir(dir.path().join("data/keys"))
            .unwrap()
            .count()
            >= 1,
        "a signing key was generated"
    );
}

async fn tampering_breaks_the_chain(backend: Backend) {
    let s = TestServer::start(backend).await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &[("a.bin", b"abc".to_vec())]);
    s.cli_ok(&["models", "add", "acme/a", "--from", src.to_str().unwrap()]);
    write_model_dir(&src, &[("a.bin", b"abcd".to_vec())]);
    s.cli_ok(&["models", "add", "acme/a", "--from", src.to_str().unwrap()]);
    s.cli_ok(&["keys", "rotate"]);
    s.cli_ok(&["keys", "rotate"]);
    let ok = s.cli_json(&["audit", "verify"]);
    assert_eq!(ok["rows"], 4);
    assert_eq!(ok["broken_at"], serde_json::Value::Null);

    let exec = |sql: &str| match backend {
        Backend::Sqlite => common::sqlite(&s.db.url).batch_execute(sql).unwrap(),
        Backend::Postgres => PgConnection::establish(&s.db.url)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
    };
    let verify = || {
        let out = s.cli(&["audit", "verify", "--json"]);
        (
            out.status.code(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        )
    };
    exec("UPDATE audit_events SET outcome = 'forged' WHERE seq = 2");
    let (code, v) = verify();
    assert_eq!(
        (code, v["broken_at"].as_i64()),
        (Some(1), Some(2)),
        "edited row: {v}"
    );
    exec("UPDATE audit_events SET outcome = 'ok' WHERE seq = 2");
    assert_eq!(verify().0, Some(0), "restoring the row restores the chain");
    exec("DELETE FROM audit_events WHERE seq = 3");
    let (code, v) = verify();
    assert_eq!(
        (code, v["broken_at"].as_i64()),
        (Some(1), Some(4)),
        "deleted row: {v}"
    );
}

on_both_backends!(tampering_breaks_the_chain);

#[test]
fn migrate_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    for expected in [
        format!("database is up to date ({all} migrations"),
        "database is up to date (0 migrations".to_string(),
    ] {
        let out = weightgate()
            .args(["migrate"])
            .env("WEIGHTGATE__DATA_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(&expected));
    }
}
