//! The official Hugging Face client (`huggingface-hub` 2.4 in the virtualenv that
//! scripts/test.sh makes) against a real weightgate: downloads, cache reuse, `hf cache
//! verify`, every denial's exception, the HfApi access-request calls, and a resumed transfer.

mod common;

use std::process::Command;

use common::{
    Backend, SMALL_BLOCKS, TestServer, application, approved_token, pseudo_random, sample_files,
    server_with_model, write_model_dir,
};
use serde_json::{Value, json};

fn python() -> std::path::PathBuf {
    let venv = std::env::var("WEIGHTGATE_TEST_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "no virtualenv with huggingface-hub at {}: run scripts/test.sh",
        venv.display()
    );
    py
}

/// Runs one scenario of tests/hf/client.py and returns what it printed.
fn hf(s: &TestServer, token: &str, command: &str, args: Value) -> Value {
    let home = s.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hf/client.py"))
        .arg(command)
        .arg(args.to_string())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("HF_HOME", s.dir.path().join("hf-home"))
        .env("HF_ENDPOINT", &s.base)
        .env("HF_TOKEN", token)
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "client.py {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn hashes() -> Value {
    let m: serde_json::Map<String, Value> = sample_files()
        .into_iter()
        .map(|(p, b)| (p.to_string(), json!(weightgate::util::sha256_hex(&b))))
        .collect();
    Value::Object(m)
}

/// Waits until every audit event queued so far is committed (the writer is FIFO), by making
/// one more request and waiting for its event.
async fn settle_audit(s: &TestServer) -> usize {
    let marker = format!("marker-{}.bin", weightgate::util::random_hex(4));
    s.http
        .head(s.url(&format!("/acme/tiny/resolve/main/{marker}")))
        .send()
        .await
        .unwrap();
    s.wait_audit("marker", |e| e["detail"]["path"] == marker.as_str())
        .await;
    s.audit()
        .iter()
        .filter(|e| e["kind"] == "file_download" || e["kind"] == "file_head")
        .count()
}

async fn hf_client_downloads_caches_and_verifies(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    // A grant that ends in 3 days, so the client is warned.
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("ada@example.org"))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let confirm = s.wait_mail(1).await[0]
        .link(&format!("{}/applications/confirm?code=", s.base))
        .unwrap();
    s.http.get(&confirm).send().await.unwrap();
    s.cli_ok(&["applications", "approve", &id, "--expires", "3d"]);
    let token = s
        .cli_ok(&[
            "tokens",
            "issue",
            "--email",
            "ada@example.org",
            "--model",
            "acme/tiny",
        ])
        .trim()
        .to_string();
    let commit = s.cli_json(&["models", "list"])[0]["main"]
        .as_str()
        .unwrap()
        .to_string();
    let expected = hashes();
    let files: Vec<&str> = sample_files().iter().map(|(p, _)| *p).collect();
    let work = s.dir.path().join("work");

    let out = hf(
        &s,
        &token,
        "download",
        json!({"repo": "acme/tiny", "files": files, "commit": commit, "nested": "tokenizer/vocab é+1.txt", "work": work}),
    );
    assert_eq!(out["hf_hub_download"], expected["tokenizer/vocab é+1.txt"]);
    for key in ["snapshot_main", "snapshot_commit", "cli_all"] {
        assert_eq!(out[key]["hashes"], expected, "{key}: {}", out[key]);
    }
    assert!(
        out["snapshot_main"]["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("snapshots/{commit}"))
    );
    assert_eq!(out["cli_all"]["code"], 0);
    assert_eq!(out["cli_one"]["code"], 0);
    assert_eq!(
        out["cli_one"]["hashes"]["tokenizer/vocab é+1.txt"],
        expected["tokenizer/vocab é+1.txt"]
    );
    assert!(
        out["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("expires on")),
        "X-HF-Warning shown: {}",
        out["warnings"]
    );

    // Fully cached: no file request reaches the server.
    let before = settle_audit(&s).await;
    let again = hf(
        &s,
        &token,
        "cached",
        json!({"repo": "acme/tiny", "files": files}),
    );
    assert_eq!(again["hashes"], expected);
    assert_eq!(
        settle_audit(&s).await,
        before + 1,
        "only the marker request was audited"
    );

    let v = hf(&s, &token, "verify", json!({"repo": "acme/tiny"}));
    assert_eq!(v["code"], 0, "{v}");
    assert!(
        v["stdout"].as_str().unwrap().contains("checksums match"),
        "{v}"
    );
}

async fn hfapi_manages_access_requests(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightgate"));
    let created = {
        use std::io::Write;
        let mut p = child
            .args(["admin", "create", "--email", "root@example.org"])
            .env_clear()
            .env("WEIGHTGATE__DATA_DIR", s.data_dir())
            .env("WEIGHTGATE__DATABASE__URL", &s.db.url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin
            .take()
            .unwrap()
            .write_all(b"correct horse battery staple\n")
            .unwrap();
        p.wait_with_output().unwrap()
    };
    assert!(created.status.success());
    let admin_token = s.cli_json(&[
        "admin",
        "token",
        "create",
        "--email",
        "root@example.org",
        "--label",
        "hfapi",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(admin_token.starts_with("wg_admin_"));

    for email in ["bob@example.org", "dave@example.org"] {
        let r = s
            .http
            .post(s.url("/api/v1/models/acme/tiny/applications"))
            .json(&application(email))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mails = s.wait_mail(2).await;
    for m in &mails {
        s.http
            .get(
                m.link(&format!("{}/applications/confirm?code=", s.base))
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
    }
    let call = |method: &str, args: Value, kwargs: Value| {
        hf(
            &s,
            &admin_token,
            "api",
            json!({"method": method, "args": args, "kwargs": kwargs}),
        )
    };

    let pending = call(
        "list_pending_access_requests",
        json!(["acme/tiny"]),
        json!({}),
    );
    assert_eq!(pending["ok"], true, "{pending}");
    let items = pending["result"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let bob = items
        .iter()
        .find(|i| i["username"] == "bob@example.org")
        .unwrap();
    assert_eq!(bob["status"], "pending");
    assert_eq!(bob["fields"]["Team size"], "3");
    assert_eq!(bob["fields"]["Affiliation"], "Analytical Engines");
    let dave_id = items
        .iter()
        .find(|i| i["username"] == "dave@example.org")
        .unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_string();

    assert_eq!(
        call(
            "accept_access_request",
            json!(["acme/tiny", "bob@example.org"]),
            json!({})
        )["ok"],
        true
    );
    let r = call(
        "reject_access_request",
        json!(["acme/tiny", "dave@example.org"]),
        json!({"rejection_reason": "Unverifiable affiliation"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let accepted = call(
        "list_accepted_access_requests",
        json!(["acme/tiny"]),
        json!({}),
    );
    assert_eq!(
        accepted["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["username"].clone())
            .collect::<Vec<_>>(),
        vec![json!("bob@example.org")]
    );
    let rejected = call(
        "list_rejected_access_requests",
        json!(["acme/tiny"]),
        json!({}),
    );
    assert_eq!(rejected["result"][0]["username"], "dave@example.org");
    let mail = s
        .wait_mail(6)
        .await
        .into_iter()
        .find(|m| m.text.contains("Unverifiable affiliation"));
    assert!(
        mail.is_some(),
        "the rejection reason reached the researcher"
    );

    // Bob can now get a token and download; Dave cannot.
    s.cli_ok(&[
        "tokens",
        "issue",
        "--email",
        "bob@example.org",
        "--model",
        "acme/tiny",
    ]);
    assert!(
        !s.cli(&[
            "tokens",
            "issue",
            "--email",
            "dave@example.org",
            "--model",
            "acme/tiny"
        ])
        .status
        .success()
    );

    // Cancel by request id: Dave is back in the queue.
    assert_eq!(
        call(
            "cancel_access_request",
            json!(["acme/tiny"]),
            json!({"request_id": dave_id})
        )["ok"],
        true
    );
    let pending = call(
        "list_pending_access_requests",
        json!(["acme/tiny"]),
        json!({}),
    );
    assert_eq!(pending["result"][0]["username"], "dave@example.org");

    // Grant to someone who never applied; a second grant is a 400.
    let g = call(
        "grant_access",
        json!(["acme/tiny", "carol@example.org"]),
        json!({}),
    );
    assert_eq!(g["ok"], true, "{g}");
    s.cli_ok(&[
        "tokens",
        "issue",
        "--email",
        "carol@example.org",
        "--model",
        "acme/tiny",
    ]);
    let again = call(
        "grant_access",
        json!(["acme/tiny", "carol@example.org"]),
        json!({}),
    );
    assert_eq!(again["ok"], false);
    assert_eq!(again["status"], 400, "{again}");

    // Gating mode through update_repo_settings, visible in model_info.
    assert_eq!(
        call(
            "update_repo_settings",
            json!(["acme/tiny"]),
            json!({"gated": "auto"})
        )["ok"],
        true
    );
    let info = call("model_info", json!(["acme/tiny"]), json!({}));
    assert_eq!(info["result"]["gated"], "auto");

    // A download token is not an admin token; no token at all is a 401.
    let bob_token = s
        .cli_ok(&[
            "tokens",
            "issue",
            "--email",
            "bob@example.org",
            "--model",
            "acme/tiny",
        ])
        .trim()
        .to_string();
    let denied = hf(
        &s,
        &bob_token,
        "api",
        json!({"method": "list_pending_access_requests", "args": ["acme/tiny"], "token": bob_token}),
    );
    assert_eq!(
        (denied["ok"].clone(), denied["status"].clone()),
        (json!(false), json!(403)),
        "{denied}"
    );
    let kinds: Vec<String> = s
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "application_approved",
        "application_rejected",
        "application_reopened",
        "model_settings_changed",
        "admin_token_issued",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k}");
    }
    assert!(
        !serde_json::to_string(&s.audit())
            .unwrap()
            .contains(&admin_token)
    );
}

on_both_backends!(
    hf_client_downloads_caches_and_verifies,
    hfapi_manages_access_requests
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denial_raises_the_right_exception() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let src = s.dir.path().join("other");
    write_model_dir(&src, &[("x.bin", b"x".to_vec())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/other",
        "--from",
        src.to_str().unwrap(),
    ]);
    let ada = approved_token(&s, "acme/tiny", "ada@example.org").await;
    // Bob has a token for acme/other only, and a pending application for acme/tiny.
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
    let confirm = s.confirmation_link("bob@example.org", "acme/tiny").await;
    s.http.get(&confirm).send().await.unwrap();
    // Carol has a token for acme/other and never applied for acme/tiny.
    let carol = approved_token(&s, "acme/other", "carol@example.org").await;

    let err = |token: &str, filename: &str| {
        hf(
            &s,
            token,
            "error",
            json!({"repo": "acme/tiny", "filename": filename}),
        )
    };
    let check = |out: &Value, class: &str, needle: &str| {
        assert_eq!(out["class"], class, "{out}");
        let text = format!("{} {}", out["message"], out["server_message"]);
        assert!(text.contains(needle), "{needle:?} not in {text}");
    };

    let out = err("", "config.json");
    check(&out, "GatedRepoError", "restricted");
    assert_eq!(out["cli_code"], 1);
    check(
        &err(&carol, "config.json"),
        "GatedRepoError",
        &format!("{}/models/acme/tiny", s.base),
    );
    check(
        &err(&bob, "config.json"),
        "GatedRepoError",
        "awaiting a review",
    );
    s.cli_ok(&[
        "applications",
        "reject",
        &bob_app,
        "--reason",
        "Team not eligible",
    ]);
    check(
        &err(&bob, "config.json"),
        "GatedRepoError",
        "Team not eligible",
    );
    check(
        &err("garbage", "config.json"),
        "GatedRepoError",
        "Invalid credentials",
    );

    // Token revoked, grant expired, grant revoked.
    let t = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
    ]);
    s.cli_ok(&["tokens", "revoke", t["jti"].as_str().unwrap()]);
    check(
        &err(t["token"].as_str().unwrap(), "config.json"),
        "GatedRepoError",
        "revoked",
    );
    {
        use diesel::connection::SimpleConnection;
        let mut c = common::sqlite(&s.db.url);
        c.batch_execute(&format!("UPDATE grants SET expires_at = {} WHERE user_id = (SELECT id FROM users WHERE email = 'ada@example.org')", weightgate::util::now() - 60)).unwrap();
    }
    check(&err(&ada, "config.json"), "GatedRepoError", "expired");

    // Not found: repo, revision, file.
    let out = hf(
        &s,
        &ada,
        "error",
        json!({"repo": "acme/ghost", "filename": "config.json"}),
    );
    assert_eq!(out["class"], "RepositoryNotFoundError", "{out}");
    let out = hf(
        &s,
        &ada,
        "error",
        json!({"repo": "acme/tiny", "filename": "config.json", "revision": "v9"}),
    );
    assert_eq!(out["class"], "RevisionNotFoundError", "{out}");
    let dave = approved_token(&s, "acme/tiny", "dave@example.org").await;
    let out = hf(
        &s,
        &dave,
        "error",
        json!({"repo": "acme/tiny", "filename": "nope.bin"}),
    );
    assert_eq!(out["class"], "RemoteEntryNotFoundError", "{out}");
    assert_eq!(
        hf(
            &s,
            &dave,
            "error",
            json!({"repo": "acme/tiny", "filename": "config.json"})
        )["class"],
        Value::Null
    );

    // Quota used up: one completed file, then the next one is refused with GatedRepoError.
    let quota = common::quota_token(&s, "dave@example.org", "acme/tiny", 1);
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/config.json"))
        .bearer_auth(&quota)
        .send()
        .await
        .unwrap();
    r.bytes().await.unwrap();
    common::eventually(
        &s.http,
        &s.url("/acme/tiny/resolve/main/model.safetensors"),
        &quota,
        403,
    )
    .await;
    check(
        &hf(
            &s,
            &quota,
            "error",
            json!({"repo": "acme/tiny", "filename": "model.safetensors"}),
        ),
        "GatedRepoError",
        "quota",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_resumed_with_range() {
    let s = TestServer::start_with(Backend::Sqlite, SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    let big = pseudo_random(24 << 20, 7);
    write_model_dir(&src, &[("model.safetensors", big.clone())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let upstream = s.base.trim_start_matches("http://").to_string();
    let out = hf(
        &s,
        &token,
        "resume",
        json!({"repo": "acme/tiny", "filename": "model.safetensors", "upstream": upstream, "cut_at": 12 << 20}),
    );
    assert_eq!(out["cut"], true, "{out}");
    assert_eq!(out["sha256"], weightgate::util::sha256_hex(&big));
    assert!(
        out["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "bytes=10485760-"),
        "resumed at the client's 10 MiB boundary: {out}"
    );
    s.wait_audit("the resumed range", |e| {
        e["outcome"] == "partial" && e["detail"]["range"] == "bytes=10485760-"
    })
    .await;
    s.wait_audit("the cut transfer", |e| e["outcome"] == "aborted_by_client")
        .await;
}

async fn tree_and_info_follow_the_contract(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let get = |path: String| s.http.get(s.url(&path)).send();

    let r = get("/api/agent-harnesses".into()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"standardEnvVars": [], "harnesses": {}})
    );

    let info: Value = get("/api/models/acme/tiny/revision/main?blobs=true".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["id"], "acme/tiny");
    let commit = info["sha"].as_str().unwrap().to_string();
    assert_eq!(commit.len(), 40);
    let sib = info["siblings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["rfilename"] == "model.safetensors")
        .unwrap()
        .clone();
    assert_eq!(
        sib["lfs"]["sha256"],
        weightgate::util::sha256_hex(&sample_files()[0].1).as_str()
    );
    assert_eq!(sib["lfs"]["size"], 300000);
    let by_sha: Value = get(format!("/api/models/acme/tiny/revision/{commit}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_sha["sha"], commit.as_str());

    // Paginated with Link; booleans in either case; the pages add up to the whole tree.
    let mut url = s.url("/api/models/acme/tiny/tree/main?recursive=True&expand=False&limit=2");
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let r = s.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let next = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_string());
        all.extend(r.json::<Vec<Value>>().await.unwrap());
        pages += 1;
        match next {
            Some(l) => {
                url = l
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string()
            }
            None => break,
        }
    }
    assert_eq!(pages, 2);
    let paths: Vec<&str> = all.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "config.json",
            "model.safetensors",
            "tokenizer",
            "tokenizer/vocab é+1.txt"
        ]
    );
    assert!(all.iter().all(|e| e.get("xetHash").is_none()));
    let file = &all[1];
    assert_eq!(file["type"], "file");
    assert_eq!(
        file["lfs"]["oid"],
        weightgate::util::sha256_hex(&sample_files()[0].1).as_str()
    );
    assert_eq!(file["oid"].as_str().unwrap().len(), 40);
    // A sub-folder, its name encoded with %2F-style escaping as the client sends it.
    let sub: Vec<Value> = get("/api/models/acme/tiny/tree/main/tokenizer?recursive=false".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0]["path"], "tokenizer/vocab é+1.txt");

    let r = get("/api/models/acme/tiny/revision/refs%2Fpr%2F1".into())
        .await
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-error-code"].to_str().unwrap()
        ),
        (404, "RevisionNotFound")
    );
    let r = get("/api/models/acme/ghost".into()).await.unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-error-code"].to_str().unwrap()
        ),
        (404, "RepoNotFound")
    );
    let r = get("/api/models/acme/tiny/tree/main/nowhere".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = get("/api/models/acme/tiny/tree/main?cursor=x".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

on_both_backends!(tree_and_info_follow_the_contract);
