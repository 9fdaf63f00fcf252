//! Pull-through from an upstream origin that this test controls: a good origin is fetched
//! once and cached verified; an origin that cuts the connection, corrupts a byte or stalls
//! leaves nothing in the cache and fails the client's transfer; concurrent first requests
//! fill once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Backend, TestServer, approved_token, pseudo_random};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD: u8 = 0;
const CUT: u8 = 1;
const CORRUPT: u8 = 2;
const STALL: u8 = 3;
const SLOW: u8 = 4;
/// The tree listing points its next page at another host.
const FOREIGN_LINK: u8 = 5;

struct Origin {
    base: String,
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicUsize>,
    data: Vec<u8>,
    /// In SLOW mode the origin sends the second half of the weights only once this is
    /// notified.
    release: Arc<tokio::sync::Notify>,
}

async fn origin() -> Origin {
    origin_with(400_000, "http://127.0.0.1:9/steal").await
}

/// An origin whose weight file has `size` bytes and whose listing, in FOREIGN_LINK mode,
/// points its next page at `foreign`.
async fn origin_with(size: usize, foreign: &str) -> Origin {
    let foreign = foreign.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let data = pseudo_random(size, 9);
    let sha = weightgate::util::sha256_hex(&data);
    let commit = "ab".repeat(20);
    let (mode, hits) = (Arc::new(AtomicU8::new(GOOD)), Arc::new(AtomicUsize::new(0)));
    let release = Arc::new(tokio::sync::Notify::new());
    let (m, h, d, go) = (mode.clone(), hits.clone(), data.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (m, h, d, go, sha, commit, foreign) = (
                m.clone(),
                h.clone(),
                d.clone(),
                go.clone(),
                sha.clone(),
                commit.clone(),
                foreign.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let head = |len: usize| {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                    )
                };
                let link = if m.load(Ordering::SeqCst) == FOREIGN_LINK {
                    format!("Link: <{foreign}>; rel=\"next\"\r\n")
                } else {
                    String::new()
                };
                let json_reply = |v: serde_json::Value| {
                    let b = v.to_string();
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/json\r\n{link}Connection: close\r\n\r\n{b}", b.len()).into_bytes()
                };
                if path.starts_with("/api/models/o/m/revision/") {
                    let _ = sock
                        .write_all(&json_reply(json!({"id": "o/m", "sha": commit})))
                        .await;
                } else if path.starts_with("/api/models/o/m/tree/") {
                    let _ = sock.write_all(&json_reply(json!([
                        {"type": "file", "path": "w.bin", "size": d.len(), "oid": "1".repeat(40), "lfs": {"oid": sha, "size": d.len(), "pointerSize": 130}},
                        {"type": "file", "path": "config.json", "size": 2, "oid": "2".repeat(40)},
                    ]))).await;
                } else if path.ends_with("/config.json") {
                    let _ = sock.write_all(format!("{}{{}}", head(2)).as_bytes()).await;
                } else if path.ends_with("/w.bin") {
                    h.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.write_all(head(d.len()).as_bytes()).await;
                    let half = d.len() / 2;
                    match m.load(Ordering::SeqCst) {
                        CUT => {
                            let _ = sock.write_all(&d[..half]).await;
                        }
                        CORRUPT => {
                            let mut bad = d.clone();
                            bad[d.len() - 3] ^= 1;
                            let _ = sock.write_all(&bad).await;
                        }
                        STALL => {
                            let _ = sock.write_all(&d[..half]).await;
                            std::future::pending::<()>().await;
                        }
                        SLOW => {
                            let _ = sock.write_all(&d[..half]).await;
                            go.notified().await;
                            let _ = sock.write_all(&d[half..]).await;
                        }
                        _ => {
                            let _ = sock.write_all(&d).await;
                        }
                    }
                } else {
                    let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                }
            });
        }
    });
    Origin {
        base,
        mode,
        hits,
        data,
        release,
    }
}

async fn server(o: &Origin) -> (TestServer, String) {
    let url: &'static str = Box::leak(o.base.clone().into_boxed_str());
    let s = TestServer::start_with(
        Backend::Sqlite,
        &[
            ("WEIGHTGATE__STORAGE__BACKEND", "upstream"),
            ("WEIGHTGATE__STORAGE__UPSTREAM_URL", url),
            ("WEIGHTGATE__STORAGE__UPSTREAM_TOKEN", "origin-secret"),
            ("WEIGHTGATE__STORAGE__UPSTREAM_IDLE_SECS", "2"),
            ("WEIGHTGATE__STORAGE__BLOCK_SIZE", "65536"),
            ("WEIGHTGATE__STORAGE__CHUNK_SIZE", "16384"),
        ],
    )
    .await;
    let report = s.cli_json(&["models", "add", "o/m", "--from-upstream"]);
    assert_eq!(report["files"].as_array().unwrap().len(), 2);
    let token = approved_token(&s, "o/m", "ada@example.org").await;
    (s, token)
}

/// Fetches the file; returns (status, bytes received, whether the body failed).
async fn get(s: &TestServer, token: &str, range: Option<&str>) -> (u16, Vec<u8>, bool) {
    let mut req = s
        .http
        .get(s.url("/o/m/resolve/main/w.bin"))
        .bearer_auth(token);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    read_all(req.send().await.unwrap()).await
}

/// Status, body, and whether the body broke off.
async fn read_all(mut r: reqwest::Response) -> (u16, Vec<u8>, bool) {
    let status = r.status().as_u16();
    let mut got = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return (status, got, false),
            Err(_) => return (status, got, true),
        }
    }
}

fn cached(s: &TestServer, o: &Origin) -> bool {
    let sha = weightgate::util::sha256_hex(&o.data);
    s.data_dir()
        .join("storage")
        .join(format!("blobs/sha256/{}/{sha}", &sha[..2]))
        .exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_origin_is_fetched_once_and_served_verified() {
    let o = origin().await;
    let (s, token) = server(&o).await;
    let (status, got, failed) = get(&s, &token, None).await;
    assert_eq!((status, failed), (200, false));
    assert!(got == o.data, "streamed through, byte for byte");
    assert!(cached(&s, &o));
    let (_, again, _) = get(&s, &token, None).await;
    assert!(again == o.data);
    let (status, part, _) = get(&s, &token, Some("bytes=100000-100099")).await;
    assert_eq!(status, 206);
    assert!(part[..] == o.data[100_000..100_100]);
    assert_eq!(o.hits.load(Ordering::SeqCst), 1, "the origin was read once");
    // Files without a published SHA-256 were fetched at import.
    let r = s
        .http
        .get(s.url("/o/m/resolve/main/config.json"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(&r.bytes().await.unwrap()[..], b"{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_origin_leaves_nothing_in_the_cache() {
    let o = origin().await;
    let (s, token) = server(&o).await;
    for (mode, what) in [(CUT, "cut"), (CORRUPT, "corrupt"), (STALL, "stall")] {
        o.mode.store(mode, Ordering::SeqCst);
        let (status, got, failed) = get(&s, &token, None).await;
        assert!(
            failed || status >= 500,
            "{what}: the client's transfer fails ({status}, {} bytes)",
            got.len()
        );
        assert!(got.len() < o.data.len(), "{what}: never a complete file");
        assert!(
            got[..] == o.data[..got.len()] || mode == CORRUPT,
            "{what}: bytes sent are the origin's"
        );
        assert!(!cached(&s, &o), "{what}: nothing cached");
        let leftovers: Vec<_> = std::fs::read_dir(s.data_dir().join("storage/tmp"))
            .map(|d| d.flatten().count())
            .into_iter()
            .collect();
        assert!(
            leftovers.iter().all(|n| *n == 0),
            "{what}: no partial file left"
        );
    }
    // The origin recovers: the next request fills the cache.
    o.mode.store(GOOD, Ordering::SeqCst);
    let (_, got, failed) = get(&s, &token, None).await;
    assert!(!failed && got == o.data);
    assert!(cached(&s, &o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_fill_once() {
    let o = origin().await;
    o.mode.store(SLOW, Ordering::SeqCst);
    let (s, token) = server(&o).await;
    let send = || {
        s.http
            .get(s.url("/o/m/resolve/main/w.bin"))
            .bearer_auth(&token)
            .send()
    };
    // Both answers have their headers, so both requests are in before the origin finishes.
    let (a, b) = tokio::join!(send(), send());
    o.release.notify_one();
    let (a, b) = tokio::join!(read_all(a.unwrap()), read_all(b.unwrap()));
    assert!(a.1 == o.data && b.1 == o.data, "both complete and correct");
    assert_eq!(o.hits.load(Ordering::SeqCst), 1, "one fill");
}

/// A client that stops reading during a fill is let go after the idle timeout: the fill
/// completes and the next request gets the file, instead of waiting behind it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_hold_up_the_fill() {
    let o = origin_with(48 << 20, "http://127.0.0.1:9/steal").await;
    let (s, token) = server(&o).await;
    let stuck = s
        .http
        .get(s.url("/o/m/resolve/main/w.bin"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(stuck.status(), 200);
    let next = tokio::time::timeout(Duration::from_secs(30), get(&s, &token, None))
        .await
        .expect("the second request was held up by the stuck client");
    assert_eq!(next.0, 200);
    assert!(next.1 == o.data, "complete and correct");
    assert!(cached(&s, &o));
    assert_eq!(o.hits.load(Ordering::SeqCst), 1, "one fill");
    drop(stuck);
}

/// A listing whose next-page link names another host is refused: the upstream token is
/// never sent there, and the model is not added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_page_on_another_host_gets_no_token() {
    let thief = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let visits = Arc::new(AtomicUsize::new(0));
    let seen = visits.clone();
    let thief_url = format!("http://{}/steal", thief.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((_sock, _)) = thief.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let o = origin_with(400_000, &thief_url).await;
    o.mode.store(FOREIGN_LINK, Ordering::SeqCst);
    let url: &'static str = Box::leak(o.base.clone().into_boxed_str());
    let s = TestServer::start_with(
        Backend::Sqlite,
        &[
            ("WEIGHTGATE__STORAGE__BACKEND", "upstream"),
            ("WEIGHTGATE__STORAGE__UPSTREAM_URL", url),
            ("WEIGHTGATE__STORAGE__UPSTREAM_TOKEN", "origin-secret"),
        ],
    )
    .await;
    let out = s.cli(&["models", "add", "o/m", "--from-upstream"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside the upstream"), "{err}");
    assert!(!err.contains("origin-secret"));
    assert_eq!(visits.load(Ordering::SeqCst), 0);
    let models = s.cli_json(&["models", "list"]);
    assert_eq!(models.as_array().map(Vec::len), Some(0), "{models}");
}

/// `weightgate download` needs block lists, which a pull-through file only has once it is
/// cached: before that the client says so (exit 11) and writes nothing; afterwards it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_client_downloads_once_files_are_cached() {
    let o = origin().await;
    let (s, token) = server(&o).await;
    let dir = s.dir.path().join("dl");
    let download = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weightgate"))
            .args(["download", "o/m", "--endpoint", &s.base, "--token", &token])
            .arg("--dir")
            .arg(&dir)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = download();
    assert_eq!(out.status.code(), Some(11));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has not pulled this file"));
    assert!(!dir.join("w.bin").exists());
    assert_eq!(get(&s, &token, None).await.1, o.data);
    let r = s
        .http
        .get(s.url("/o/m/resolve/main/config.json"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"{}");
    let out = download();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("w.bin")).unwrap(), o.data);
}

/// An empty weight file not yet cached: filled first, then served like a cached one, so its
/// final event is committed before the headers (actix never polls a `Content-Length: 0`
/// body, so a streamed pull-through would have been recorded as aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_from_the_origin_is_recorded_complete() {
    let o = origin_with(0, "http://127.0.0.1:9/steal").await;
    let (s, token) = server(&o).await;
    assert!(!cached(&s, &o), "not fetched at import");
    let (status, got, failed) = get(&s, &token, None).await;
    assert_eq!((status, got.len(), failed), (200, 0, false));
    assert!(cached(&s, &o), "filled before the answer");
    // Committed before the answer: the log has it already.
    let ends = s.downloads_of("w.bin");
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["outcome"], "complete");
}
