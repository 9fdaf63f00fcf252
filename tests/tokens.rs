//! Tokens in depth: key rotation and retirement with the JWKS, quotas that count completed
//! files, signed links, researcher self-service, user deletion, and a security suite of
//! forged, stale and hostile requests, with the server's own logs checked for leaked tokens.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{
    Backend, SMALL_BLOCKS, TestServer, application, approved, approved_token, eventually,
    raw_request, sample_files, server_with_model,
};
use serde_json::{Value, json};
use weightgate::auth::tokens::Claims;

fn b64json(v: &Value) -> String {
    B64.encode(serde_json::to_vec(v).unwrap())
}

fn claims_for(s: &TestServer, model: &str, exp_in: i64, nbf_in: i64) -> Claims {
    let now = weightgate::util::now();
    Claims {
        iss: s.settings.issuer(),
        aud: "weightgate".into(),
        sub: "someone".into(),
        iat: now,
        nbf: now + nbf_in,
        exp: now + exp_in,
        jti: weightgate::util::random_hex(8),
        models: vec![model.into()],
        max_downloads: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_retire_and_publish_a_jwks() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let old = approved_token(&s, "acme/tiny", "ada@example.org").await;
    s.cli_ok(&["keys", "rotate"]);
    let new = s
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
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    assert_ne!(kid(&old), kid(&new), "the new key signs new tokens");
    let file = s.url("/acme/tiny/resolve/main/config.json");
    for t in [&old, &new] {
        assert_eq!(
            s.http
                .get(&file)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }

    // A generic JWT library verifies the token with nothing but the published JWKS.
    let jwks: jsonwebtoken::jwk::JwkSet = s
        .http
        .get(s.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks.keys.len(), 2);
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid(&new)).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["weightgate"]);
    v.set_issuer(&[s.settings.issuer()]);
    let data =
        jsonwebtoken::decode::<Claims>(&new, &key, &v).expect("verifies with the JWKS alone");
    assert_eq!(data.claims.models, vec!["acme/tiny".to_string()]);
    for claim in ["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "models"] {
        let payload: Value =
            serde_json::from_slice(&B64.decode(new.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert!(payload.get(claim).is_some(), "{claim}");
    }

    // Retiring the old key: its tokens stop working (the server re-reads keys within the
    // refresh period), the new key's keep working, and the JWKS drops it.
    s.cli_ok(&["keys", "retire", &kid(&old)]);
    let t0 = Instant::now();
    let r = eventually(&s.http, &file, &old, 401).await;
    assert!(
        t0.elapsed() < Duration::from_secs(7),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&new)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let jwks: Value = s
        .http
        .get(s.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    let out = s.cli(&["keys", "retire", &kid(&new)]);
    assert!(!out.status.success(), "the last live key cannot be retired");
}

async fn quotas_count_completed_files(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let (_, status_url) = approved(&s, "acme/tiny", "ada@example.org").await;
    let token = common::quota_token(&s, "ada@example.org", "acme/tiny", 2);
    let big = s.url("/acme/tiny/resolve/main/model.safetensors");
    let get = |url: String, range: Option<&'static str>| {
        let mut r = s.http.get(url).bearer_auth(&token);
        if let Some(range) = range {
            r = r.header("Range", range);
        }
        r.send()
    };
    let completed = || async {
        let st: Value = s
            .http
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        st["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["max_downloads"] == 2)
            .unwrap()["downloads_completed"]
            .as_i64()
            .unwrap()
    };
    let wait_completed = |n: i64| async move {
        let deadline = Instant::now() + Duration::from_secs(15);
        while completed().await != n {
            assert!(
                Instant::now() < deadline,
                "downloads_completed never reached {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval for the async delivery record
        }
    };

    // HEADs and a first part of the file burn nothing.
    assert_eq!(
        s.http
            .head(&big)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = get(big.clone(), Some("bytes=0-99999")).await.unwrap();
    assert_eq!(
        r.headers()["x-weightgate-quota-remaining"],
        "1",
        "places left besides this file"
    );
    assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    // The resumed rest completes the file: one download.
    let r = get(big.clone(), Some("bytes=100000-")).await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 200_000);
    wait_completed(1).await;
    // Re-reading it is free.
    let r = get(big.clone(), None).await.unwrap();
    assert_eq!(r.headers()["x-weightgate-quota-remaining"], "1");
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    let r = get(s.url("/acme/tiny/resolve/main/config.json"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    wait_completed(2).await;
    // A third, different file: the quota is used up, and the client is told so.
    let r = get(
        s.url("/acme/tiny/resolve/main/tokenizer/vocab%20%C3%A9%2B1.txt"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-error-code"], "GatedRepo");
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "quota_exhausted");
    // Files already downloaded stay available.
    assert_eq!(
        get(s.url("/acme/tiny/resolve/main/config.json"), None)
            .await
            .unwrap()
            .status(),
        200
    );
    let st: Value = s
        .http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = st["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["max_downloads"] == 2)
        .unwrap()
        .clone();
    assert_eq!(t["downloads_remaining"], 0);
    assert!(t["last_used_at"].as_i64().is_some());
}

async fn researcher_self_service(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let (first, status_url) = approved(&s, "acme/tiny", "ada@example.org").await;
    let (_, other_status) = approved(&s, "acme/tiny", "bob@example.org").await;
    let api = status_url.replacen("/applications/", "/api/v1/applications/", 1);
    let (base, key) = api.split_once("?key=").unwrap();
    let file = s.url("/acme/tiny/resolve/main/config.json");

    let r = s
        .http
        .post(format!("{base}/tokens?key={key}"))
        .json(&json!({"label": "laptop", "ttl": "2d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let fresh = issued["token"].as_str().unwrap().to_string();
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&fresh)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let st: Value = s
        .http
        .get(&status_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tokens = st["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().any(|t| t["label"] == "laptop"));
    assert!(
        !serde_json::to_string(&st).unwrap().contains(&fresh),
        "the raw token is never shown again"
    );

    // Revoking through the status page takes effect at once on this server.
    let jti = issued["jti"].as_str().unwrap();
    let r = s
        .http
        .delete(format!("{base}/tokens/{jti}?key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s.http.get(&file).bearer_auth(&fresh).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "token_revoked");
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&first)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Someone else's status key opens nothing here; a wrong key opens nothing at all.
    let other_key = other_status.split_once("?key=").unwrap().1;
    let first_jti = st["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == "")
        .unwrap()["jti"]
        .as_str()
        .unwrap()
        .to_string();
    let other_base = other_status.split_once("?key=").unwrap().0.replacen(
        "/applications/",
        "/api/v1/applications/",
        1,
    );
    let r = s
        .http
        .delete(format!("{other_base}/tokens/{first_jti}?key={other_key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .delete(format!("{base}/tokens/{first_jti}?key=wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        s.http
            .get(&file)
            .bearer_auth(&first)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn parallel_requests_cannot_overrun_a_quota(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    approved(&s, "acme/tiny", "ada@example.org").await;
    let token = common::quota_token(&s, "ada@example.org", "acme/tiny", 2);
    let paths = [
        "model.safetensors",
        "config.json",
        "tokenizer/vocab%20%C3%A9%2B1.txt",
    ];
    let requests = paths.iter().map(|p| {
        s.http
            .get(s.url(&format!("/acme/tiny/resolve/main/{p}")))
            .bearer_auth(&token)
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        1,
        "{statuses:?}"
    );
}

on_both_backends!(
    quotas_count_completed_files,
    researcher_self_service,
    parallel_requests_cannot_overrun_a_quota
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_links_work_with_plain_clients_and_die_with_their_token() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let (token, status_url) = approved(&s, "acme/tiny", "ada@example.org").await;
    let mint = |body: Value| {
        s.http
            .post(s.url("/api/v1/links"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let r = mint(json!({"model": "acme/tiny", "path": "model.safetensors"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let link: Value = r.json().await.unwrap();
    let url = link["url"].as_str().unwrap().to_string();
    let ttl = link["expires_at"].as_i64().unwrap() - weightgate::util::now();
    assert!(
        (3590..=3600).contains(&ttl),
        "default lifetime is one hour ({ttl})"
    );
    assert!(!url.contains(&token), "the token itself is not in the link");

    // Plain client, no credentials.
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], &sample_files()[0].1[..]);
    let wget = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&wget.stdout), "200");

    // Only for its file; tampering breaks it; no token, no link.
    let other = url.replace("/model.safetensors?", "/config.json?");
    assert_eq!(reqwest::get(&other).await.unwrap().status(), 403);
    let mut tampered = url.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 401);
    let r = s
        .http
        .post(s.url("/api/v1/links"))
        .json(&json!({"model": "acme/tiny", "path": "config.json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = mint(json!({"model": "acme/tiny", "path": "nope.bin"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = mint(json!({"model": "acme/tiny", "path": "../x"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = mint(json!({"model": "acme/tiny", "path": "config.json", "ttl": "30d"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // An expired link (signed by the server's own key, so only the time is wrong).
    let keys = weightgate::auth::keys::Keyring::open(&s.data_dir()).unwrap();
    let commit = url
        .split("/resolve/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let jti = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .unwrap()
        .claims["jti"]
        .as_str()
        .unwrap()
        .to_string();
    let stale = weightgate::auth::links::LinkClaims {
        iss: s.settings.issuer(),
        aud: "weightgate:link".into(),
        sub: "x".into(),
        iat: 0,
        exp: weightgate::util::now() - 3600,
        tok: jti.clone(),
        model: "acme/tiny".into(),
        rev: commit.clone(),
        path: "config.json".into(),
    };
    let expired = weightgate::auth::links::sign(&keys, &stale).unwrap();
    let r = reqwest::get(s.url(&format!(
        "/acme/tiny/resolve/{commit}/config.json?link={expired}"
    )))
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "link_expired");
    // A download token is no link, and a link is no token.
    let link_jwt = url.split("link=").nth(1).unwrap().to_string();
    assert_eq!(
        s.http
            .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
            .bearer_auth(&link_jwt)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        reqwest::get(s.url(&format!(
            "/acme/tiny/resolve/{commit}/config.json?link={token}"
        )))
        .await
        .unwrap()
        .status(),
        401
    );

    // Revoking the token kills its links.
    let api = status_url.replacen("/applications/", "/api/v1/applications/", 1);
    let (base, key) = api.split_once("?key=").unwrap();
    assert_eq!(
        s.http
            .delete(format!("{base}/tokens/{jti}?key={key}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_researcher_closes_the_door_and_frees_the_address() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let file = s.url("/acme/tiny/resolve/main/config.json");
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
    s.cli_ok(&["users", "delete", "--email", "ada@example.org"]);
    let t0 = Instant::now();
    eventually(&s.http, &file, &token, 403).await;
    assert!(t0.elapsed() < Duration::from_secs(6));
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("ada@example.org"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the address can apply again");
    assert!(
        !s.cli_ok(&["applications", "list", "--json"])
            .contains("Ada Lovelace\",\n    \"email\": \"deleted")
    );
}

/// `weightgate serve` as its own process, with its log captured.
struct Spawned {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(env: &[(String, String)]) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "debug")
        .env("WEIGHTGATE__LOG__FORMAT", "json")
        .envs(env.iter().cloned())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .strip_prefix("weightgate listening on ")
                .and_then(|r| r.split_whitespace().next())
            {
                let _ = tx.send(addr.to_string());
            }
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server start");
    Spawned {
        child,
        base: format!("http://{addr}"),
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_forged_requests_are_refused_without_leaking_the_token() {
    // Set the model and researcher up with an in-process server, then serve the same data
    // from a separate process whose debug log we can read.
    let mut s = TestServer::start_with(Backend::Sqlite, SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    common::write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/other",
        "--from",
        src.to_str().unwrap(),
    ]);
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let other = approved_token(&s, "acme/other", "bob@example.org").await;
    let quota = common::quota_token(&s, "ada@example.org", "acme/tiny", 1);
    let revoked = s.cli_json(&[
        "tokens",
        "issue",
        "--email",
        "ada@example.org",
        "--model",
        "acme/tiny",
    ]);
    s.cli_ok(&["tokens", "revoke", revoked["jti"].as_str().unwrap()]);
    let revoked = revoked["token"].as_str().unwrap().to_string();
    s.stop().await;
    let srv = spawn_server(&[
        (
            "WEIGHTGATE__DATA_DIR".into(),
            s.data_dir().display().to_string(),
        ),
        ("WEIGHTGATE__DATABASE__URL".into(), s.db.url.clone()),
        ("WEIGHTGATE__SERVER__BIND".into(), "127.0.0.1:0".into()),
        ("WEIGHTGATE__SERVER__PUBLIC_URL".into(), s.base.clone()),
    ]);
    let http = reqwest::Client::new();
    let file = format!("{}/acme/tiny/resolve/main/config.json", srv.base);
    assert_eq!(
        http.get(&file)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let jwks: Value = http
        .get(format!("{}/.well-known/jwks.json", srv.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    let public = B64.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
    let good_claims = serde_json::to_value(claims_for(&s, "acme/tiny", 3600, 0)).unwrap();
    let own = weightgate::auth::keys::Keyring::open(&s.data_dir()).unwrap();
    let sign = |c: &Claims| weightgate::auth::tokens::sign(&own, c).unwrap().0;

    let alg_none = format!(
        "{}.{}.",
        b64json(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64json(&good_claims)
    );
    let hs256 = |secret: &[u8]| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &h,
            &good_claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let tampered = {
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        payload["models"] = json!(["acme/tiny", "acme/other"]);
        payload["exp"] = json!(payload["exp"].as_i64().unwrap() + 86400 * 365);
        format!("{}.{}.{}", parts[0], b64json(&payload), parts[2])
    };
    let mut wrong_aud = claims_for(&s, "acme/tiny", 3600, 0);
    wrong_aud.aud = "someone-else".into();
    let mut wrong_iss = claims_for(&s, "acme/tiny", 3600, 0);
    wrong_iss.iss = "https://evil.example".into();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("alg none", alg_none, 401, "invalid_token"),
        (
            "HS256 keyed with the public key",
            hs256(&public),
            401,
            "invalid_token",
        ),
        (
            "HS256 keyed with the JWK text",
            hs256(jwks["keys"][0]["x"].as_str().unwrap().as_bytes()),
            401,
            "invalid_token",
        ),
        ("tampered payload", tampered, 401, "invalid_token"),
        ("wrong aud", sign(&wrong_aud), 401, "invalid_token"),
        ("wrong iss", sign(&wrong_iss), 401, "invalid_token"),
        (
            "expired",
            sign(&claims_for(&s, "acme/tiny", -3600, -7200)),
            401,
            "token_expired",
        ),
        (
            "nbf in the future",
            sign(&claims_for(&s, "acme/tiny", 7200, 3600)),
            401,
            "token_not_yet_valid",
        ),
        (
            "unknown jti, valid signature",
            sign(&claims_for(&s, "acme/tiny", 3600, 0)),
            401,
            "invalid_token",
        ),
        ("another model's token", other.clone(), 403, "not_applied"),
        ("revoked", revoked.clone(), 403, "token_revoked"),
        ("oversized token", "a".repeat(5000), 401, "invalid_token"),
    ];
    let mut secrets = vec![token.clone(), other.clone(), quota.clone(), revoked.clone()];
    for (what, bad, status, code) in &cases {
        let r = http.get(&file).bearer_auth(bad).send().await.unwrap();
        assert_eq!(r.status().as_u16(), *status, "{what}");
        assert_eq!(r.headers()["x-error-code"], "GatedRepo", "{what}");
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"], *code, "{what}: {text}");
        assert!(
            !text.contains(bad.as_str()),
            "{what}: the response echoes the token"
        );
        secrets.push(bad.clone());
    }

    // Quota: one completed file, then the next one is refused.
    let r = http.get(&file).bearer_auth(&quota).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http
            .get(format!(
                "{}/acme/tiny/resolve/main/model.safetensors",
                srv.base
            ))
            .bearer_auth(&quota)
            .send()
            .await
            .unwrap();
        if r.status() == 403 {
            assert_eq!(r.json::<Value>().await.unwrap()["error"], "quota_exhausted");
            break;
        }
        assert!(Instant::now() < deadline, "quota never ran out");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval for the async delivery record
    }

    // Path traversal in every encoding, sent raw.
    let auth = format!("Bearer {token}");
    for path in [
        "/acme/tiny/resolve/main/../../etc/passwd",
        "/acme/tiny/resolve/main/%2e%2e/%2e%2e/etc/passwd",
        "/acme/tiny/resolve/main/..%2f..%2fetc%2fpasswd",
        "/acme/tiny/resolve/main/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/acme/tiny/resolve/main/..%5c..%5cetc%5cpasswd",
        "/acme/tiny/resolve/main/..\\..\\etc\\passwd",
        "/acme/tiny/resolve/main//etc/passwd",
        "/acme/tiny/resolve/main/%2Fetc%2Fpasswd",
        "/acme/tiny/resolve/main/config.json%00.txt",
        "/acme/tiny/resolve/%2e%2e/config.json",
        "/acme/%2e%2e/resolve/main/config.json",
    ] {
        let (status, text) = raw_request(&srv.base, path, &[("Authorization", &auth)]).await;
        assert!(matches!(status, 400 | 404), "{path}: {status}");
        assert!(
            !text.contains("root:") && !text.contains("hidden_size"),
            "{path} served something"
        );
    }

    // A revision that is too long or holds control characters is refused by name, before it
    // is looked up or logged; a long Range list is served (its first range) and logged short.
    let long_rev = format!("/acme/tiny/resolve/{}/config.json", "r".repeat(4000));
    for path in [long_rev.as_str(), "/acme/tiny/resolve/ma%01in/config.json"] {
        let (status, text) = raw_request(&srv.base, path, &[("Authorization", &auth)]).await;
        assert_eq!(status, 400, "{}: {text}", &path[..60.min(path.len())]);
        assert!(text.contains("bad_revision"), "{text}");
    }
    let ranges = format!("bytes=0-1{}", ",3-4".repeat(2000));
    let (status, text) = raw_request(
        &srv.base,
        "/acme/tiny/resolve/main/config.json",
        &[("Authorization", &auth), ("Range", &ranges)],
    )
    .await;
    assert_eq!(status, 206, "{text}");
    let logged = s
        .wait_audit("the ranged download", |e| {
            e["detail"]["range"]
                .as_str()
                .is_some_and(|r| r.starts_with("bytes=0-1,3-4"))
        })
        .await;
    assert_eq!(logged["detail"]["range"].as_str().unwrap().len(), 128);

    // Oversized headers are refused before they reach a handler.
    let huge = "x".repeat(64 * 1024);
    let (status, _) = raw_request(
        &srv.base,
        "/acme/tiny/resolve/main/config.json",
        &[("Authorization", &format!("Bearer {huge}"))],
    )
    .await;
    assert!(
        matches!(status, 400 | 401 | 413 | 431),
        "oversized header: {status}"
    );

    // Neither the server's log nor the audit log holds any token we sent.
    let log = srv.log.lock().unwrap().clone();
    assert!(
        log.contains("weightgate is serving"),
        "the log was captured"
    );
    assert!(
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["span"]["request_id"].is_string()),
        "JSON log lines carry the request id"
    );
    let audit = s.cli_ok(&["audit", "export", "--format", "jsonl"]);
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a token appears in the server log"
        );
        assert!(
            !audit.contains(secret.as_str()),
            "a token appears in the audit log"
        );
    }
    assert!(
        !log.contains("ada@example.org") && !audit.contains("ada@example.org"),
        "no email address in logs"
    );
}
