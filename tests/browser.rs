//! The pages in a real browser: Debian's Chromium driven by playwright-core (installed in
//! tests/browser by scripts/test.sh) walks apply → confirm from the real email → admin setup
//! and login → approve, reject, bulk approve → the researcher's token downloads the file,
//! with hostile input that must stay inert. Screenshots land in target/browser-artifacts.

mod common;

use std::process::Command;

use common::{Backend, application, sample_files, server_with_model};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_in_chromium() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    // The model asks one custom question.
    let questions = json!([{"label": "Team size", "kind": "text", "required": true}]).to_string();
    {
        use diesel::connection::SimpleConnection;
        let mut c = common::sqlite(&s.db.url);
        c.batch_execute(&format!("UPDATE models SET questions = '{questions}', license = 'Research only.' WHERE id = 'acme/tiny'")).unwrap();
    }
    // Three more applicants, confirmed: two for the bulk approval, one to reject.
    let mut reject_status = String::new();
    for (email, name) in [
        ("b1@example.org", "Bulk One"),
        ("b2@example.org", "Bulk Two"),
        ("rex@example.org", "Rex Rejected"),
    ] {
        let mut a = application(email);
        a["name"] = json!(name);
        let r = s
            .http
            .post(s.url("/api/v1/models/acme/tiny/applications"))
            .json(&a)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let body: Value = r.json().await.unwrap();
        if email.starts_with("rex") {
            reject_status = body["status_url"].as_str().unwrap().to_string();
        }
        let link = s.confirmation_link(email, "acme/tiny").await;
        s.http.get(&link).send().await.unwrap();
    }
    let db = weightgate::db::Db::open(&s.settings).unwrap();
    let code = weightgate::auth::session::setup_code(&db)
        .await
        .unwrap()
        .expect("no admin yet");

    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/test.sh"
    );
    let out = Command::new("node")
        .arg("flow.mjs")
        .current_dir(&dir)
        .env("BASE", &s.base)
        .env("OUTBOX", s.data_dir().join("outbox"))
        .env("ARTIFACTS", &artifacts)
        .env("SETUP_URL", format!("{}/admin/setup?code={code}", s.base))
        .env("REJECT_STATUS_URL", &reject_status)
        .env("REJECT_NAME", "Rex Rejected")
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "flow.mjs failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    let step = |name: &str| {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {v}"))
            .clone()
    };

    assert_eq!(step("confirmed")["status"], "pending");
    let login = step("logged_in");
    assert_eq!(
        (login["httpOnly"].clone(), login["sameSite"].clone()),
        (json!(true), json!("Strict"))
    );
    let queue = step("queue");
    assert_eq!(queue["rows"], 4);
    assert_eq!(
        queue["hostileNameShown"], true,
        "hostile text is shown as text"
    );
    assert_eq!(queue["xss"], Value::Null, "no injected script ran");
    assert!(
        step("approved_one")["notice"]
            .as_str()
            .unwrap()
            .contains("1 approved")
    );
    assert!(
        step("rejected_one")["notice"]
            .as_str()
            .unwrap()
            .contains("1 rejected")
    );
    let bulk = step("bulk");
    assert!(
        bulk["notice"].as_str().unwrap().contains("2 approved"),
        "{bulk}"
    );
    assert_eq!(bulk["left"], 0);
    let csv = step("csv");
    assert_eq!(
        (csv["defused"].clone(), csv["raw"].clone()),
        (json!(true), json!(false)),
        "{csv}"
    );
    assert_eq!(step("csrf")["status"], 403);
    assert_eq!(step("model_page")["hasChart"], 1);
    let status = step("status");
    assert_eq!(
        (status["status"].clone(), status["xss"].clone()),
        (json!("approved"), Value::Null)
    );
    let rejected = step("rejected_status");
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["reason"], "Affiliation could not be verified");
    assert!(
        step("after_logout")["url"]
            .as_str()
            .unwrap()
            .ends_with("/admin/login")
    );
    assert!(
        step("lockout")["message"]
            .as_str()
            .unwrap()
            .contains("Too many failed logins"),
        "{v}"
    );
    assert_eq!(
        v["dialogs"],
        json!([]),
        "no alert, confirm or prompt was opened"
    );
    assert_eq!(v["xss"], Value::Null);

    // The token the researcher issued in the browser downloads the file.
    let token = step("token");
    assert_eq!(
        token["curl"], true,
        "download instructions carry the server's URL"
    );
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(token["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], &sample_files()[0].1[..]);
    for shot in ["1-apply.png", "3-queue.png", "5-model.png", "7-token.png"] {
        assert!(
            artifacts.join(shot).metadata().unwrap().len() > 1000,
            "{shot}"
        );
    }
    // Logins were audited, successes and failures, without the password.
    let audit = s.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "admin_login" && e["outcome"] == "ok")
    );
    assert!(
        audit
            .iter()
            .filter(|e| e["kind"] == "admin_login" && e["outcome"] == "failure")
            .count()
            >= 5
    );
    assert!(
        !serde_json::to_string(&audit)
            .unwrap()
            .contains("a long admin password")
    );
}
