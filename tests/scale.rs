//! Several replicas on one PostgreSQL database and one storage, and the operations endpoints.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, application, approved, server_with_model};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_revocations_decisions_and_the_chain() {
    let mut a = server_with_model(Backend::Postgres, "acme/tiny").await;
    let (token, status_url) = approved(&a, "acme/tiny", "ada@example.org").await;
    let b = a.replica().await;
    let file_b = b.url("/acme/tiny/resolve/main/config.json");
    assert_eq!(
        b.http
            .get(&file_b)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "a token from one replica works on the other"
    );

    // Revoked through A (self-service), refused by B within the configured bound.
    let jti = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .unwrap()
        .claims["jti"]
        .as_str()
        .unwrap()
        .to_string();
    let api = status_url.replacen("/applications/", "/api/v1/applications/", 1);
    let (base, key) = api.split_once("?key=").unwrap();
    assert_eq!(
        a.http
            .delete(format!("{base}/tokens/{jti}?key={key}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let t0 = Instant::now();
    common::eventually(&b.http, &file_b, &token, 403).await;
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );

    // The same application approved from both replicas at once: one grant, one email.
    let r = a
        .http
        .post(a.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("bob@example.org"))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    a.http
        .get(a.confirmation_link("bob@example.org", "acme/tiny").await)
        .send()
        .await
        .unwrap();
    let admin = common::admin_token(&a);
    let body = json!({"requestId": id, "status": "accepted"});
    let (ra, rb) = tokio::join!(
        a.http
            .post(a.url("/api/models/acme/tiny/user-access-request/handle"))
            .bearer_auth(&admin)
            .json(&body)
            .send(),
        b.http
            .post(b.url("/api/models/acme/tiny/user-access-request/handle"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    );
    let statuses = [ra.unwrap().status().as_u16(), rb.unwrap().status().as_u16()];
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    let grants = a
        .audit()
        .iter()
        .filter(|e| {
            e["kind"] == "application_approved" && e["detail"]["application"] == id.as_str()
        })
        .count();
    assert_eq!(grants, 1);
    let db = weightgate::db::Db::open(&a.settings).unwrap();
    let approvals = db
        .read_blocking(weightgate::db::models::outbox::list_all)
        .unwrap()
        .iter()
        .filter(|m| m.kind == "approved" && m.to_addr == "bob@example.org")
        .count();
    assert_eq!(approvals, 1, "one approval email");

    // Concurrent downloads through both keep one valid chain.
    let bob = a
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
    let mut gets = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        gets.push(
            s.http
                .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
                .bearer_auth(&bob)
                .send(),
        );
    }
    for r in futures_util::future::join_all(gets).await {
        assert_eq!(r.unwrap().bytes().await.unwrap().len(), 300_000);
    }
    // One replica goes away; the other keeps serving.
    a.stop().await;
    let r = b
        .http
        .get(b.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    b.wait_audit("b's last download", |e| e["outcome"] == "complete")
        .await;
    let v = b.cli_json(&["audit", "verify"]);
    assert_eq!(v["broken_at"], Value::Null, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let token = common::approved_token(&s, "acme/tiny", "ada@example.org").await;
    s.http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    s.http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        s.http.get(s.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        s.http.get(s.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = s.metrics().await;
        if t.contains("weightgate_bytes_served_total 600000") || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll until the bodies have ended
    };
    assert!(
        text.contains("weightgate_bytes_served_total 600000"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/{org}/{name}/resolve/{tail:.*}\",method=\"GET\",status=\"200\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("weightgate_token_cache_hits_total 1"),
        "the second request was answered from the cache: {text}"
    );
    assert!(
        text.contains("weightgate_blocks_verified_total 10"),
        "{text}"
    );
    // One download after the other: each read and verified its own bytes.
    assert!(
        text.contains("weightgate_stream_bytes_total{source=\"read\"} 600000\n")
            && text.contains("weightgate_stream_bytes_total{source=\"shared\"} 0\n"),
        "{text}"
    );
    assert!(!text.contains(&token));
    let api: Value = s
        .http
        .get(s.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["openapi"], "3.1.0");
    assert!(api["paths"]["/api/v1/models/{org}/{name}/applications"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_lets_downloads_finish() {
    let mut s = common::TestServer::start_with(
        Backend::Sqlite,
        &[
            ("WEIGHTGATE__SERVER__DRAIN_SECS", "2"),
            ("WEIGHTGATE__STORAGE__BLOCK_SIZE", "65536"),
            ("WEIGHTGATE__STORAGE__CHUNK_SIZE", "16384"),
        ],
    )
    .await;
    let src = s.dir.path().join("src");
    common::write_model_dir(&src, &common::sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let token = common::approved_token(&s, "acme/tiny", "ada@example.org").await;
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/config.json"))
        .header("X-Request-Id", "trace-me-1")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"],
        "trace-me-1",
        "the request id is echoed"
    );
    assert_eq!(
        s.http
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .headers()["x-request-id"]
            .len(),
        16
    );
    // Downloads skip the router, other methods on their paths still meet it, and both are
    // counted under the download route.
    for (method, status) in [(reqwest::Method::POST, 405), (reqwest::Method::HEAD, 200)] {
        let url = s.url("/acme/tiny/resolve/main/config.json");
        let r = s.http.request(method, url).bearer_auth(&token).send();
        let r = r.await.unwrap();
        assert_eq!(r.status(), status);
        assert!(r.headers().contains_key("x-request-id"));
    }
    let metrics = s.metrics().await;
    for (method, status) in [("GET", 200), ("HEAD", 200), ("POST", 405)] {
        let line = format!(
            "weightgate_http_requests_total{{route=\"/{{org}}/{{name}}/resolve/{{tail:.*}}\",method=\"{method}\",status=\"{status}\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    // A download is in flight when shutdown begins.
    let mut inflight = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let first = inflight.chunk().await.unwrap().unwrap();
    s.begin_stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = s
            .http
            .get(s.url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if st == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "readyz never turned unready");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll until the drain starts
    }
    assert_eq!(
        s.http.get(s.url("/healthz")).send().await.unwrap().status(),
        200,
        "still serving while draining"
    );
    let mut got = first.to_vec();
    while let Some(c) = inflight.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert!(
        got == common::sample_files()[0].1,
        "the in-flight download finished"
    );
    s.stop().await;
}
