//! S3-compatible storage against a real S3-protocol server on loopback (moto): import by
//! upload, import in place (objects already in the bucket), verified downloads, and a
//! corrupted object caught before its bytes go out.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Backend, SMALL_BLOCKS, TestServer, approved_token, free_port, sample_files, write_model_dir,
};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn moto(http: &reqwest::Client) -> (Moto, String) {
    let port = free_port();
    let bin = common::venv_python().with_file_name("moto_server");
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server (scripts/test.sh installs it)");
    let guard = Moto(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(&base).send().await.is_err() {
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(50)).await; // readiness poll
    }
    let r = http.put(format!("{base}/weights")).send().await.unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    (guard, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_storage_serves_verified_bytes() {
    let http = reqwest::Client::new();
    let (_moto, s3) = moto(&http).await;
    let mut env = SMALL_BLOCKS.to_vec();
    env.extend_from_slice(&[
        ("WEIGHTGATE__STORAGE__BACKEND", "s3"),
        ("WEIGHTGATE__STORAGE__S3_BUCKET", "weights"),
        ("WEIGHTGATE__STORAGE__S3_ACCESS_KEY_ID", "test"),
        ("WEIGHTGATE__STORAGE__S3_SECRET_ACCESS_KEY", "test-secret"),
    ]);
    let s3_leak: &'static str = Box::leak(s3.clone().into_boxed_str());
    env.push(("WEIGHTGATE__STORAGE__S3_ENDPOINT", s3_leak));
    let s = TestServer::start_with(Backend::Sqlite, &env).await;
    assert!(
        !s.data_dir().join("storage").exists(),
        "nothing is stored locally"
    );

    // Upload a folder.
    let src = s.dir.path().join("src");
    write_model_dir(&src, &sample_files());
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let big = sample_files()[0].1.clone();
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], &big[..]);
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .header("Range", "bytes=70000-70009")
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &big[70000..70010]);

    // Objects already in the bucket are registered where they are.
    let weights = common::pseudo_random(150_000, 5);
    for (key, body) in [
        ("incoming/w.bin", weights.clone()),
        ("incoming/sub/config.json", b"{}".to_vec()),
    ] {
        let r = http
            .put(format!("{s3}/weights/{key}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let report = s.cli_json(&["models", "add", "acme/inplace", "--from-bucket", "incoming"]);
    assert_eq!(report["files"].as_array().unwrap().len(), 2);
    let token2 = approved_token(&s, "acme/inplace", "bob@example.org").await;
    let r = s
        .http
        .get(s.url("/acme/inplace/resolve/main/w.bin"))
        .bearer_auth(&token2)
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], &weights[..]);

    // Someone changes the object behind weightgate's back: caught, quarantined, 503.
    let mut bad = weights.clone();
    bad[100_000] ^= 1;
    // (Written with credentials, as another tool with access to the bucket would.)
    let store = weightgate::storage::Store::open(&s.settings).unwrap();
    object_store::ObjectStoreExt::put(
        &*store.inner,
        &weightgate::storage::Store::path("incoming/w.bin"),
        bad.clone().into(),
    )
    .await
    .unwrap();
    let now_there = object_store::ObjectStoreExt::get(
        &*store.inner,
        &weightgate::storage::Store::path("incoming/w.bin"),
    )
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert!(now_there[..] == bad[..], "the object was replaced");
    let mut r = s
        .http
        .get(s.url("/acme/inplace/resolve/main/w.bin"))
        .bearer_auth(&token2)
        .send()
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut failed = r.status() != 200;
    while !failed {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break,
            Err(_) => failed = true,
        }
    }
    assert!(failed, "the transfer must not complete");
    assert!(
        got.len() <= 65536 && got[..] == weights[..got.len()],
        "only verified bytes went out ({})",
        got.len()
    );
    s.wait_audit("quarantine", |e| e["kind"] == "integrity_failure")
        .await;
    let scrub = s.cli(&["models", "scrub", "acme/tiny"]);
    assert!(
        scrub.status.success(),
        "the untouched model still verifies on S3"
    );
}
