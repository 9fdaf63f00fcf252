//! Notifications that are never lost: mail through a real SMTP server (aiosmtpd) that is down
//! and then up, permanent failures visible to admins, two replicas sending each message once,
//! expiry warnings and digests, and signed webhooks delivered in order through failures.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Backend, TestServer, application, approved, free_port, sample_files, start_helper,
    write_model_dir,
};
use serde_json::{Value, json};
use weightgate::db::models::outbox;

/// Messages the SMTP sink accepted: (recipients, raw message with quoted-printable undone).
fn received(dir: &Path) -> Vec<(Vec<String>, String)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            let to = v["to"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            (to, common::decode_qp(v["data"].as_str().unwrap()))
        })
        .collect()
}

async fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval while workers deliver
    }
}

fn outbox_rows(s: &TestServer) -> Vec<outbox::OutboxMail> {
    let db = weightgate::db::Db::open(&s.settings).unwrap();
    db.read_blocking(outbox::list_all).unwrap()
}

async fn smtp_server(backend: Backend, port: u16, extra: &[(&str, &str)]) -> TestServer {
    let port_s = port.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("WEIGHTGATE__MAIL__TRANSPORT", "smtp"),
        ("WEIGHTGATE__MAIL__SMTP_HOST", "127.0.0.1"),
        ("WEIGHTGATE__MAIL__SMTP_TLS", "none"),
        ("WEIGHTGATE__MAIL__RETRY_BASE_SECS", "1"),
        ("WEIGHTGATE__MAIL__FROM", "Model Gate <gate@example.org>"),
    ];
    env.extend_from_slice(extra);
    let port_leak: &'static str = Box::leak(port_s.into_boxed_str());
    env.push(("WEIGHTGATE__MAIL__SMTP_PORT", port_leak));
    let s = TestServer::start_with(backend, &env).await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    s
}

async fn mail_survives_an_smtp_outage(backend: Backend) {
    let port = free_port();
    let s = smtp_server(backend, port, &[]).await;
    // SMTP is down: apply, confirm (the link is read from the outbox row), approve.
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("ada@example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "the application is accepted while mail is down"
    );
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let confirm = until("a failed attempt", 15, || {
        let rows = outbox_rows(&s);
        rows.iter()
            .find(|m| m.attempts > 0 && m.last_error.is_some())
            .map(|_| rows[0].body_text.clone())
    })
    .await;
    let link = confirm
        .split_whitespace()
        .find(|w| w.contains("/applications/confirm?code="))
        .unwrap()
        .to_string();
    assert!(link.starts_with(&s.base), "links use the public URL");
    s.http.get(&link).send().await.unwrap();
    s.cli_ok(&["applications", "approve", &id]);

    // SMTP comes up: every message arrives, each exactly once.
    let inbox = s.dir.path().join("inbox");
    let _smtp = start_helper(
        "smtp_sink.py",
        &[&port.to_string(), inbox.to_str().unwrap()],
    );
    until("all mail sent", 30, || {
        outbox_rows(&s)
            .iter()
            .all(|m| m.sent_at.is_some())
            .then_some(())
    })
    .await;
    let got = received(&inbox);
    let subjects: Vec<String> = got
        .iter()
        .map(|(_, m)| {
            m.lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(got.len(), 3, "{subjects:?}");
    let mut unique = subjects.clone();
    unique.dedup();
    assert_eq!(unique.len(), 3, "no duplicates: {subjects:?}");
    for (to, m) in &got {
        assert_eq!(to, &vec!["ada@example.org".to_string()]);
        assert!(
            m.contains("From: \"Model Gate\" <gate@example.org>")
                || m.contains("From: Model Gate <gate@example.org>"),
            "{m}"
        );
        assert!(
            m.contains("Content-Type: text/html") && m.contains("Content-Type: text/plain"),
            "both parts"
        );
        assert!(!m.contains("eyJ"), "no token in any email");
    }
    let approved_mail = &got
        .iter()
        .find(|(_, m)| m.contains("approved"))
        .expect("approval mail")
        .1;
    assert!(approved_mail.contains(&format!("{}/applications/{id}?key=", s.base)));
}

async fn permanent_failures_are_marked_and_shown(backend: Backend) {
    let port = free_port();
    let inbox = tempfile::tempdir().unwrap();
    let _smtp = start_helper(
        "smtp_sink.py",
        &[&port.to_string(), inbox.path().to_str().unwrap()],
    );
    let s = smtp_server(backend, port, &[]).await;
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("bounce@example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let row = until("a permanent failure", 20, || {
        outbox_rows(&s).into_iter().find(|m| m.failed_at.is_some())
    })
    .await;
    assert_eq!(row.attempts, 1, "a 5xx is not retried");
    assert!(row.last_error.as_deref().unwrap_or("").contains("550"));
    // Visible to administrators.
    let admin = common::admin_token(&s);
    let failed: Value = s
        .http
        .get(s.url("/api/v1/admin/outbox/failed"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(failed[0]["to"], "bounce@example.org");
}

async fn two_replicas_send_each_message_once(backend: Backend) {
    let port = free_port();
    let inbox = tempfile::tempdir().unwrap();
    let _smtp = start_helper(
        "smtp_sink.py",
        &[&port.to_string(), inbox.path().to_str().unwrap()],
    );
    let a = smtp_server(backend, port, &[]).await;
    let b = a.replica().await;
    let mut sends = Vec::new();
    for i in 0..20 {
        let server = if i % 2 == 0 { &a } else { &b };
        sends.push(
            server
                .http
                .post(server.url("/api/v1/models/acme/tiny/applications"))
                .json(&application(&format!("r{i}@example.org")))
                .send(),
        );
    }
    for r in futures_util::future::join_all(sends).await {
        assert_eq!(r.unwrap().status(), 201);
    }
    until("20 messages sent", 30, || {
        outbox_rows(&a)
            .iter()
            .filter(|m| m.sent_at.is_some())
            .count()
            .eq(&20)
            .then_some(())
    })
    .await;
    // Both workers have had more passes by now; still 20.
    let got = received(inbox.path());
    assert_eq!(got.len(), 20, "each message exactly once");
    let mut to: Vec<String> = got.iter().map(|(t, _)| t[0].clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 20);
}

on_both_backends!(
    mail_survives_an_smtp_outage,
    permanent_failures_are_marked_and_shown,
    two_replicas_send_each_message_once
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_warnings_notices_digests_and_revocations() {
    let s = TestServer::start_with(
        Backend::Sqlite,
        &[
            ("WEIGHTGATE__MAIL__NOTICES_INTERVAL", "1s"),
            ("WEIGHTGATE__MAIL__ADMIN_EMAILS", "ops@example.org"),
        ],
    )
    .await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let (token, _) = approved(&s, "acme/tiny", "ada@example.org").await;
    let sql = |q: &str| {
        use diesel::connection::SimpleConnection;
        let mut c = common::sqlite(&s.db.url);
        c.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
        c.batch_execute(q).unwrap();
    };
    let now = weightgate::util::now();
    sql(&format!(
        "UPDATE grants SET expires_at = {} ",
        now + 3 * 86400
    ));
    let warn = s
        .wait_for_mail("expiry warning", |m| {
            m.header("Subject")
                .is_some_and(|x| x.contains("less than 7 days"))
        })
        .await;
    assert_eq!(warn.header("To").as_deref(), Some("ada@example.org"));
    sql(&format!("UPDATE grants SET expires_at = {} ", now - 10));
    s.wait_for_mail("expired notice", |m| {
        m.header("Subject").is_some_and(|x| x.contains("has ended"))
    })
    .await;
    s.wait_audit("grant_expired event", |e| e["kind"] == "grant_expired")
        .await;
    // One of each, however many passes ran.
    s.wait_audit("a later pass", |e| e["kind"] == "grant_expired")
        .await;
    let mails = s.wait_mail(0).await;
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.header("Subject").unwrap().contains("less than 7 days"))
            .count(),
        1
    );
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.header("Subject").unwrap().contains("has ended"))
            .count(),
        1
    );

    // An administrator giving more time re-arms the warning for the new end date.
    let later = now + 2 * 86400;
    let db = weightgate::db::Db::open(&s.settings).unwrap();
    db.write(move |c| {
        use diesel::prelude::*;
        use weightgate::db::schema::grants;
        let id: String = grants::table.select(grants::id).first(c)?;
        assert!(weightgate::db::models::access::set_grant_expiry(
            c,
            &id,
            Some(later)
        )?);
        Ok(())
    })
    .await
    .unwrap();
    let ends = weightgate::util::rfc3339(later);
    s.wait_for_mail("a warning for the new end date", |m| {
        m.header("Subject")
            .is_some_and(|x| x.contains("less than 7 days"))
            && m.text.contains(&ends)
    })
    .await;

    // A digest model: admins get one message listing the day's applications, none per application.
    sql("UPDATE models SET notify = 'digest'");
    for email in ["d1@example.org", "d2@example.org"] {
        s.http
            .post(s.url("/api/v1/models/acme/tiny/applications"))
            .json(&application(email))
            .send()
            .await
            .unwrap();
        let link = s.confirmation_link(email, "acme/tiny").await;
        s.http.get(&link).send().await.unwrap();
    }
    sql("DELETE FROM kv WHERE key = 'last_digest_at'");
    let digest = s
        .wait_for_mail("digest", |m| {
            m.header("Subject").is_some_and(|x| x.contains("to review"))
        })
        .await;
    assert!(digest.text.contains("2 new application"), "{}", digest.text);
    let per_application = s
        .wait_mail(0)
        .await
        .into_iter()
        .filter(|m| {
            m.header("Subject")
                .is_some_and(|x| x.starts_with("New application"))
        })
        .count();
    assert_eq!(
        per_application, 1,
        "only ada's application (before the switch to digest) was announced singly"
    );

    // An administrator revoking a token tells its owner.
    let jti = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .unwrap()
        .claims["jti"]
        .as_str()
        .unwrap()
        .to_string();
    s.cli_ok(&["tokens", "revoke", &jti]);
    s.wait_for_mail("token revoked", |m| {
        m.header("Subject")
            .is_some_and(|x| x.contains("was revoked"))
    })
    .await;
}

async fn webhooks_are_signed_retried_and_ordered(backend: Backend) {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let _rx = start_helper(
        "hook_receiver.py",
        &[&port.to_string(), log.path().to_str().unwrap(), "2"],
    );
    let s = TestServer::start_with(backend, &[("WEIGHTGATE__MAIL__RETRY_BASE_SECS", "1")]).await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let secret = "a-shared-secret-of-some-length";
    let hook = s.cli_json(&[
        "webhooks",
        "add",
        &format!("http://127.0.0.1:{port}/hook"),
        "--secret",
        secret,
        "--events",
        "application.submitted,application.confirmed,application.approved,token.revoked",
    ]);
    assert!(
        !hook.to_string().contains(secret),
        "the secret is never shown back"
    );
    let (token, _) = approved(&s, "acme/tiny", "ada@example.org").await;
    let jti = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .unwrap()
        .claims["jti"]
        .as_str()
        .unwrap()
        .to_string();
    s.cli_ok(&["tokens", "revoke", &jti]);

    let read = || -> Vec<Value> {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let accepted = until("four deliveries", 40, || {
        let ok: Vec<Value> = read().into_iter().filter(|r| r["status"] == 200).collect();
        (ok.len() >= 4).then_some(ok)
    })
    .await;
    let events: Vec<String> = accepted
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(r["body"].as_str().unwrap()).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        events,
        [
            "application.submitted",
            "application.confirmed",
            "application.approved",
            "token.revoked"
        ],
        "in order, each once"
    );
    assert_eq!(
        read().iter().filter(|r| r["status"] == 500).count(),
        2,
        "the first two attempts failed and were retried"
    );
    for r in &accepted {
        let body = r["body"].as_str().unwrap();
        let h = &r["headers"];
        assert_eq!(
            h["x-weightgate-signature"].as_str().unwrap(),
            weightgate::webhooks::signature(secret, body.as_bytes())
        );
        let payload: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            h["x-weightgate-timestamp"].as_str().unwrap(),
            payload["timestamp"].to_string()
        );
        assert!(
            !body.contains(&token) && !body.contains(secret) && !body.contains("ada@example.org"),
            "no secrets or addresses in payloads"
        );
    }
    let deliveries = s.cli_json(&["webhooks", "deliveries", hook["id"].as_str().unwrap()]);
    let first = deliveries
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event"] == "application.submitted")
        .unwrap();
    assert_eq!(first["attempts"], 3);
    assert!(first["sent_at"].as_i64().is_some());
    let _ = json!(null);
}

on_both_backends!(webhooks_are_signed_retried_and_ordered);
