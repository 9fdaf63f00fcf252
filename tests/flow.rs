//! The whole mission end to end, on SQLite and on PostgreSQL: import → apply → confirm by the
//! emailed link → approve → issue → verified download → audit, and every way in which a
//! request must be turned away.

mod common;

use common::{
    Backend, SMALL_BLOCKS, TestServer, application, approved_token, raw_request, sample_files,
    server_with_model, write_model_dir,
};
use serde_json::{Value, json};

async fn full_flow(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let files = sample_files();

    // Apply: 201, a status link, and a confirmation email with a working link.
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("Ada@Example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let submitted: Value = r.json().await.unwrap();
    assert_eq!(submitted["status"], "unverified");
    let id = submitted["id"].as_str().unwrap().to_string();
    let status_url = submitted["status_url"].as_str().unwrap().to_string();
    assert!(status_url.starts_with(&format!("{}/applications/{id}?key=", s.base)));

    let mails = s.wait_mail(1).await;
    let mail = &mails[0];
    assert_eq!(mail.header("To").as_deref(), Some("ada@example.org"));
    assert!(mail.header("Subject").unwrap().contains("acme/tiny"));
    assert!(mail.raw.contains("text/html"), "has an HTML part");
    let confirm = mail
        .link(&format!("{}/applications/confirm?code=", s.base))
        .expect("link with the public URL");

    // Before confirmation the application is not in the review queue.
    let pending = s.cli_json(&["applications", "list", "--status", "pending"]);
    assert_eq!(pending.as_array().unwrap().len(), 0);

    let r = s
        .http
        .get(&confirm)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "pending");
    // A second click is harmless.
    let r = s
        .http
        .get(&confirm)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "pending");

    let pending = s.cli_json(&["applications", "list", "--status", "pending"]);
    let row = &pending.as_array().unwrap()[0];
    assert_eq!(row["id"], id.as_str());
    assert_eq!(row["answers"], r#"{"Team size":"3"}"#);

    // Not approved yet: no token can be issued.
    let out = s.cli(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
    ]);
    assert!(!out.status.success());

    let grant = s.cli_json(&["applications", "approve", &id, "--expires", "30d"]);
    let expires = grant["expires_at"].as_i64().unwrap();
    let now = weightgate::util::now();
    assert!(
        (expires - now - 30 * 86400).abs() < 120,
        "expiry is 30 days out"
    );
    let approved_mail = s
        .wait_mail(3)
        .await
        .into_iter()
        .find(|m| m.header("Subject").unwrap().contains("approved"))
        .expect("approval email");
    assert!(
        approved_mail
            .text
            .contains(&format!("{}/applications/{id}?key=", s.base))
    );

    let status: Value = s
        .http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "approved");
    assert_eq!(status["grant_active"], true);

    let issued = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
        "--ttl",
        "7d",
    ]);
    let token = issued["token"].as_str().unwrap().to_string();
    let jti = issued["jti"].as_str().unwrap().to_string();
    let header: Value = {
        use base64::Engine;
        let h = token.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));

    // Every file, byte for byte, with its identity headers.
    for (path, bytes) in &files {
        let enc = path
            .split('/')
            .map(|seg| {
                percent_encoding::utf8_percent_encode(seg, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("/");
        let r = s
            .http
            .get(s.url(&format!("/acme/tiny/resolve/main/{enc}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let sha = weightgate::util::sha256_hex(bytes);
        assert_eq!(r.headers()["etag"], format!("\"{sha}\"").as_str());
        assert_eq!(r.headers()["x-linked-etag"], format!("\"{sha}\"").as_str());
        assert_eq!(
            r.headers()["content-length"],
            bytes.len().to_string().as_str()
        );
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        assert_eq!(r.headers()["x-repo-commit"].len(), 40);
        assert_eq!(&r.bytes().await.unwrap()[..], &bytes[..], "{path}");
    }

    // HEAD: exact size, no body.
    let r = s
        .http
        .head(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");

    // Ranges: N-, N-M across a block boundary, -K; and ?token= works like the header.
    let big = &files[0].1;
    for (range, from, to) in [
        ("bytes=65530-", 65530, 300_000),
        ("bytes=65530-131080", 65530, 131_081),
        ("bytes=-10", 299_990, 300_000),
    ] {
        let r = s
            .http
            .get(s.url(&format!(
                "/acme/tiny/resolve/main/model.safetensors?token={token}"
            )))
            .header("Range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {from}-{}/300000", to - 1).as_str()
        );
        assert_eq!(&r.bytes().await.unwrap()[..], &big[from..to], "{range}");
    }

    // The audit log has the whole story, and its chain verifies.
    s.wait_audit("complete download of the big file", |e| {
        e["kind"] == "file_download"
            && e["outcome"] == "complete"
            && e["detail"]["path"] == "model.safetensors"
            && e["detail"]["bytes_sent"] == 300000
            && e["detail"]["jti"] == jti.as_str()
    })
    .await;
    s.wait_audit("ranged download", |e| {
        e["kind"] == "file_download"
            && e["detail"]["range"] == "bytes=-10"
            && e["detail"]["bytes_sent"] == 10
    })
    .await;
    s.wait_audit("HEAD", |e| e["kind"] == "file_head" && e["outcome"] == "ok")
        .await;
    let events = s.audit();
    for kind in [
        "model_imported",
        "application_submitted",
        "application_confirmed",
        "application_approved",
        "token_issued",
    ] {
        assert!(events.iter().any(|e| e["kind"] == kind), "no {kind} event");
    }
    let dl = events
        .iter()
        .find(|e| e["kind"] == "file_download")
        .unwrap();
    for field in [
        "user",
        "revision",
        "commit",
        "path",
        "range",
        "bytes_sent",
        "client",
        "duration_ms",
    ] {
        assert!(
            dl["detail"].get(field).is_some(),
            "download event lacks {field}"
        );
    }
    assert_eq!(dl["model"], "acme/tiny");
    assert!(
        !serde_json::to_string(&events).unwrap().contains(&token),
        "the raw token never reaches the audit log"
    );
    let verdict = s.cli_json(&["audit", "verify"]);
    assert_eq!(verdict["broken_at"], Value::Null);
    assert_eq!(verdict["rows"].as_i64().unwrap() as usize, events.len());
}

async fn denials(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let src2 = s.dir.path().join("src2");
    write_model_dir(&src2, &[("other.bin", b"other model".to_vec())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/other",
        "--from",
        src2.to_str().unwrap(),
    ]);
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let other_token = approved_token(&s, "acme/other", "bob@example.org").await;
    let file = s.url("/acme/tiny/resolve/main/config.json");

    let check = |r: reqwest::Response, status: u16, hub: Option<&str>, code: &str| {
        assert_eq!(r.status().as_u16(), status, "expected {code}");
        assert_eq!(
            r.headers().get("x-error-code").map(|v| v.to_str().unwrap()),
            hub,
            "hub code for {code}"
        );
        if hub.is_some() {
            assert!(!r.headers()["x-error-message"].is_empty());
        }
        r
    };
    let body = |r: reqwest::Response| async { r.json::<Value>().await.unwrap() };

    // No token.
    let r = check(
        s.http.get(&file).send().await.unwrap(),
        401,
        Some("GatedRepo"),
        "token_missing",
    );
    assert!(
        r.headers()["x-error-message"]
            .to_str()
            .unwrap()
            .contains(&format!("{}/models/acme/tiny", s.base))
    );
    assert_eq!(body(r).await["error"], "token_missing");
    // Garbage and a tampered signature.
    check(
        s.http
            .get(&file)
            .bearer_auth("not-a-jwt")
            .send()
            .await
            .unwrap(),
        401,
        Some("GatedRepo"),
        "garbage",
    );
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let r = check(
        s.http
            .get(&file)
            .bearer_auth(&tampered)
            .send()
            .await
            .unwrap(),
        401,
        Some("GatedRepo"),
        "bad signature",
    );
    assert_eq!(body(r).await["error"], "invalid_token");
    // A token signed with a key this server never had.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = weightgate::auth::keys::Keyring::open(stranger_dir.path()).unwrap();
    let claims = |exp_offset: i64| weightgate::auth::tokens::Claims {
        iss: s.settings.issuer(),
        aud: "weightgate".into(),
        sub: "u".into(),
        iat: weightgate::util::now(),
        nbf: weightgate::util::now() - 10,
        exp: weightgate::util::now() + exp_offset,
        jti: "j".into(),
        models: vec!["acme/tiny".into()],
        max_downloads: None,
    };
    let (forged, _) = weightgate::auth::tokens::sign(&stranger, &claims(3600)).unwrap();
    check(
        s.http.get(&file).bearer_auth(&forged).send().await.unwrap(),
        401,
        Some("GatedRepo"),
        "unknown key",
    );
    // Expired (signed by the server's own key, so only the time is wrong).
    let own = weightgate::auth::keys::Keyring::open(&s.data_dir()).unwrap();
    let (expired, _) = weightgate::auth::tokens::sign(&own, &claims(-3600)).unwrap();
    let r = check(
        s.http
            .get(&file)
            .bearer_auth(&expired)
            .send()
            .await
            .unwrap(),
        401,
        Some("GatedRepo"),
        "expired",
    );
    assert_eq!(body(r).await["error"], "token_expired");
    // Another model's token.
    let r = check(
        s.http
            .get(&file)
            .bearer_auth(&other_token)
            .send()
            .await
            .unwrap(),
        403,
        Some("GatedRepo"),
        "scope",
    );
    assert_eq!(body(r).await["error"], "not_applied");
    // HEAD denials carry the message in the header (HEAD has no body).
    let r = check(
        s.http.head(&file).send().await.unwrap(),
        401,
        Some("GatedRepo"),
        "HEAD without token",
    );
    assert!(
        r.headers()["x-error-message"]
            .to_str()
            .unwrap()
            .contains("restricted")
    );

    // Unknown file, revision, repo.
    let r = check(
        s.http
            .get(s.url("/acme/tiny/resolve/main/nope.bin"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        404,
        Some("EntryNotFound"),
        "entry",
    );
    assert_eq!(r.headers()["x-repo-commit"].len(), 40);
    check(
        s.http
            .get(s.url("/acme/tiny/resolve/v9/config.json"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        404,
        Some("RevisionNotFound"),
        "revision",
    );
    check(
        s.http
            .get(s.url("/acme/ghost/resolve/main/config.json"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        404,
        Some("RepoNotFound"),
        "repo",
    );

    // Path traversal, sent raw so no client normalises it away.
    let auth = format!("Bearer {token}");
    for path in [
        "/acme/tiny/resolve/main/../../../etc/passwd",
        "/acme/tiny/resolve/main/%2E%2E/%2E%2E/etc/passwd",
        "/acme/tiny/resolve/main/..%2F..%2Fetc%2Fpasswd",
        "/acme/tiny/resolve/main/tokenizer/%00x",
    ] {
        let (status, text) = raw_request(&s.base, path, &[("Authorization", &auth)]).await;
        assert!(status == 400 || status == 404, "{path}: {status}");
        assert!(!text.contains("root:"), "{path} leaked a file");
    }

    // Malformed and unsatisfiable ranges: 416 with the size.
    for range in ["bytes=abc", "bytes=5-1", "bytes=999999-", "bytes=0-1x,4-5"] {
        let r = s
            .http
            .get(&file)
            .bearer_auth(&token)
            .header("Range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(r.headers()["content-range"], "bytes */18");
        assert_eq!(body(r).await["error"], "bad_range");
    }

    // Revoked token: 403 on the next request.
    let jti = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
    ]);
    let (t2, jti) = (
        jti["token"].as_str().unwrap().to_string(),
        jti["jti"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&t2)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Revoked by another process (the CLI): the server's token cache notices within
    // tokens.revocation_refresh_secs (5 s by default).
    s.cli_ok(&["tokens", "revoke", &jti]);
    let revoked_at = std::time::Instant::now();
    let r = common::eventually(&s.http, &file, &t2, 403).await;
    assert!(
        revoked_at.elapsed() < std::time::Duration::from_secs(6),
        "revocation took {:?}",
        revoked_at.elapsed()
    );
    let r = check(r, 403, Some("GatedRepo"), "revoked");
    assert_eq!(body(r).await["error"], "token_revoked");
    // The first token still works: revocation is per token.
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Denials are audited with their reason.
    s.wait_audit("denied revoked token", |e| {
        e["outcome"] == "denied" && e["detail"]["reason"] == "token_revoked"
    })
    .await;
    s.wait_audit("denied without token", |e| {
        e["outcome"] == "denied" && e["detail"]["reason"] == "token_missing"
    })
    .await;
}

async fn bad_applications(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let url = s.url("/api/v1/models/acme/tiny/applications");
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"email": "a@b.org", "affiliation": "x", "country": "FR", "intended_use": "x", "accept_license": true}),
            "name",
        ),
        (
            {
                let mut a = application("not-an-email");
                a["email"] = json!("not-an-email");
                a
            },
            "email",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["country"] = json!("Narnia");
                a
            },
            "country",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["accept_license"] = json!(false);
                a
            },
            "accept_license",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["name"] = json!("x".repeat(201));
                a
            },
            "name",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["intended_use"] = json!("   ");
                a
            },
            "intended_use",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["name"] = json!("Eve\r\nBcc: everyone@example.org");
                a
            },
            "name",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["answers"] = json!({"q": {"nested": true}});
                a
            },
            "answers",
        ),
        (
            {
                let mut a = application("a@b.org");
                a["surprise"] = json!(1);
                a
            },
            "surprise",
        ),
    ];
    for (payload, field) in cases {
        let r = s.http.post(&url).json(&payload).send().await.unwrap();
        assert_eq!(r.status(), 400, "{field}");
        let b: Value = r.json().await.unwrap();
        assert!(
            b["message"].as_str().unwrap().contains(field),
            "message names {field}: {b}"
        );
        assert!(b["error"].is_string());
    }
    // Not JSON, and too large.
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(format!("{{\"name\":\"{}\"}}", "x".repeat(100_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Unknown model.
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/ghost/applications"))
        .json(&application("a@b.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Nothing was written: no application, no mail, no audit event.
    assert_eq!(
        s.cli_json(&["applications", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(s.wait_mail(0).await.len(), 0);
    assert!(
        !s.audit()
            .iter()
            .any(|e| e["kind"] == "application_submitted")
    );

    // One open application per researcher and model.
    assert_eq!(
        s.http
            .post(&url)
            .json(&application("a@b.org"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let r = s
        .http
        .post(&url)
        .json(&application("A@B.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    // A forged confirmation code changes nothing.
    let r = s
        .http
        .get(s.url("/applications/confirm?code=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Rejecting needs a reason, and then the researcher is told it.
    let id = s.cli_json(&["applications", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.cli(&["applications", "approve", &id]);
    assert!(
        !out.status.success(),
        "an unconfirmed application cannot be approved"
    );
    let confirm = s.wait_mail(1).await[0]
        .link(&format!("{}/applications/confirm?code=", s.base))
        .unwrap();
    s.http.get(&confirm).send().await.unwrap();
    assert!(
        !s.cli(&["applications", "reject", &id, "--reason", ""])
            .status
            .success()
    );
    s.cli_ok(&[
        "applications",
        "reject",
        &id,
        "--reason",
        "Affiliation could not be verified.",
    ]);
    let mails = s.wait_mail(3).await;
    let rejected = mails
        .iter()
        .find(|m| m.text.contains("has been rejected"))
        .expect("rejection email");
    assert!(rejected.text.contains("Affiliation could not be verified."));
    assert!(
        !s.cli(&["applications", "approve", &id]).status.success(),
        "a decided application stays decided"
    );
}

async fn reimport(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let src = s.dir.path().join("src");
    let first = s.cli_json(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    assert_eq!(first["changed"], false, "same content, same revision");
    let old_commit = first["commit"].as_str().unwrap().to_string();
    std::fs::write(src.join("config.json"), b"{\"hidden_size\": 16}").unwrap();
    let second = s.cli_json(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    assert_eq!(second["changed"], true);
    let new_commit = second["commit"].as_str().unwrap().to_string();
    assert_ne!(old_commit, new_commit);
    assert_eq!(new_commit.len(), 40);

    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let get = |rev: String| {
        s.http
            .get(s.url(&format!("/acme/tiny/resolve/{rev}/config.json")))
            .bearer_auth(&token)
            .send()
    };
    let r = get("main".into()).await.unwrap();
    assert_eq!(r.headers()["x-repo-commit"], new_commit.as_str());
    assert_eq!(&r.bytes().await.unwrap()[..], b"{\"hidden_size\": 16}");
    let r = get(old_commit.clone()).await.unwrap();
    assert_eq!(r.headers()["x-repo-commit"], old_commit.as_str());
    assert_eq!(&r.bytes().await.unwrap()[..], br#"{"hidden_size": 8}"#);

    // A publisher's SHA256SUMS is checked; a mismatch refuses the import and changes nothing.
    std::fs::write(
        src.join("SHA256SUMS"),
        format!("{}  config.json\n", "0".repeat(64)),
    )
    .unwrap();
    std::fs::write(src.join("config.json"), b"{\"hidden_size\": 32}").unwrap();
    let out = s.cli(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    let r = get("main".into()).await.unwrap();
    assert_eq!(r.headers()["x-repo-commit"], new_commit.as_str());
    let storage = s.data_dir().join("storage");
    let leftovers: Vec<_> = walk(&storage)
        .into_iter()
        .filter(|p| p.starts_with(&format!("{}/tmp", storage.display())))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staged copies were removed: {leftovers:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

async fn corrupted_block_is_never_served(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let big = sample_files()[0].1.clone();
    let sha = weightgate::util::sha256_hex(&big);
    let stored = s
        .data_dir()
        .join("storage")
        .join(format!("blobs/sha256/{}/{sha}", &sha[..2]));
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[200_000] ^= 0x01; // in the fourth 64 KiB block
    std::fs::write(&stored, &bytes).unwrap();

    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut received = Vec::new();
    let mut stream = r;
    let failed = loop {
        match stream.chunk().await {
            Ok(Some(c)) => received.extend_from_slice(&c),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(failed, "the transfer must fail, not end quietly");
    assert!(
        received.len() <= 196_608,
        "nothing from the bad block was sent ({} bytes)",
        received.len()
    );
    assert_eq!(
        &received[..],
        &big[..received.len()],
        "every byte received is correct"
    );

    s.wait_audit("integrity failure", |e| {
        e["kind"] == "integrity_failure" && e["detail"]["sha256"] == sha.as_str()
    })
    .await;
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "quarantined");
    // Other files are unaffected.
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/config.json"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn auto_gating_approves_at_confirmation(backend: Backend) {
    let s = TestServer::start_with(backend, SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/open",
        "--from",
        src.to_str().unwrap(),
        "--gating",
        "auto",
    ]);
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/open/applications"))
        .json(&application("eve@example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let status_url = r.json::<Value>().await.unwrap()["status_url"]
        .as_str()
        .unwrap()
        .to_string();
    // Still unconfirmed: auto mode decides only once the email is confirmed.
    let status: Value = s
        .http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "unverified");
    let confirm = s.wait_mail(1).await[0]
        .link(&format!("{}/applications/confirm?code=", s.base))
        .unwrap();
    let page = s
        .http
        .get(&confirm)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("approved"), "{page}");
    let status: Value = s
        .http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "approved");
    // The researcher issues their own token from the status link and downloads.
    let token_url = status_url
        .replacen("/applications/", "/api/v1/applications/", 1)
        .replacen("?key=", "/tokens?key=", 1);
    let r = s
        .http
        .post(&token_url)
        .json(&json!({"ttl": "1d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .http
        .get(s.url("/acme/open/resolve/main/config.json"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A wrong key opens nothing.
    let r = s
        .http
        .post(token_url.replace("key=", "key=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let approved = s
        .wait_audit("auto approval", |e| e["kind"] == "application_approved")
        .await;
    assert_eq!(approved["actor"], "auto:auto");
}

on_both_backends!(
    auto_gating_approves_at_confirmation,
    full_flow,
    denials,
    bad_applications,
    reimport,
    corrupted_block_is_never_served
);
