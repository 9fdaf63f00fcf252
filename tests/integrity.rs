//! No corrupted byte ever leaves: flipped bytes at the edges and middle of a multi-block file,
//! truncated, grown and missing objects, quarantine and its release, scrubs, published
//! manifests, and the conditional/range rules of RFC 9110.

mod common;

use std::path::PathBuf;

use common::{
    Backend, SMALL_BLOCKS, TestServer, approved_token, pseudo_random, sample_files,
    server_with_model, write_model_dir,
};
use serde_json::Value;

const BLOCK: usize = 65536;

fn stored_path(s: &TestServer, bytes: &[u8]) -> PathBuf {
    let sha = weightgate::util::sha256_hex(bytes);
    s.data_dir()
        .join("storage")
        .join(format!("blobs/sha256/{}/{sha}", &sha[..2]))
}

/// Downloads what the server sends; returns (status, bytes received, whether the body failed).
async fn fetch(
    s: &TestServer,
    token: &str,
    path: &str,
    range: Option<&str>,
) -> (u16, Vec<u8>, bool) {
    let mut req = s
        .http
        .get(s.url(&format!("/acme/tiny/resolve/main/{path}")))
        .bearer_auth(token);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let mut got = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return (status, got, false),
            Err(_) => return (status, got, true),
        }
    }
}

/// Writes `files` into a publisher's folder and imports (or re-imports) it as `acme/tiny`.
fn import_tiny(s: &TestServer, files: &[(&str, Vec<u8>)]) {
    let src = s.dir.path().join("src");
    write_model_dir(&src, files);
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
}

async fn every_kind_of_damage_is_caught(backend: Backend) {
    let admin = [("WEIGHTGATE__MAIL__ADMIN_EMAILS", "ops@example.org")];
    let s = TestServer::start_with(backend, &[SMALL_BLOCKS, &admin].concat()).await;
    import_tiny(&s, &sample_files());
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let good = sample_files()[0].1.clone();
    let stored = stored_path(&s, &good);
    let len = good.len();

    enum Damage {
        Flip(usize),
        Truncate(usize),
        Extend,
        Remove,
    }
    let cases = [
        ("first byte", Damage::Flip(0)),
        ("block boundary", Damage::Flip(BLOCK)),
        ("middle", Damage::Flip(len / 2)),
        ("last byte", Damage::Flip(len - 1)),
        ("truncated", Damage::Truncate(200_000)),
        ("extended", Damage::Extend),
        ("missing", Damage::Remove),
    ];
    for (round, (what, damage)) in cases.iter().enumerate() {
        let bad_block = match damage {
            Damage::Flip(at) => Some(at / BLOCK),
            _ => None,
        };
        match damage {
            Damage::Flip(at) => {
                let mut b = good.clone();
                b[*at] ^= 0x80;
                std::fs::write(&stored, b).unwrap();
            }
            Damage::Truncate(n) => std::fs::write(&stored, &good[..*n]).unwrap(),
            Damage::Extend => std::fs::write(&stored, [&good[..], b"trailing"].concat()).unwrap(),
            Damage::Remove => std::fs::remove_file(&stored).unwrap(),
        }

        // A range that stays clear of a flipped block is verified and served in full.
        if let Some(b) = bad_block {
            let clear = if b == 0 {
                (BLOCK, 2 * BLOCK)
            } else {
                (0, BLOCK)
            };
            let (status, got, failed) = fetch(
                &s,
                &token,
                "model.safetensors",
                Some(&format!("bytes={}-{}", clear.0, clear.1 - 1)),
            )
            .await;
            assert_eq!((status, failed), (206, false), "{what}: clear range");
            assert_eq!(got, &good[clear.0..clear.1], "{what}: clear range bytes");
        }

        // The whole file: the transfer fails before the bad block; every byte received is right.
        let (status, got, failed) = fetch(&s, &token, "model.safetensors", None).await;
        assert!(
            status == 503 || (status == 200 && failed),
            "{what}: status {status}, failed {failed}"
        );
        if status == 200 {
            assert_eq!(
                &got[..],
                &good[..got.len().min(len)],
                "{what}: received bytes are correct"
            );
        }
        if let Some(b) = bad_block.filter(|_| status == 200) {
            assert!(
                got.len() <= b * BLOCK,
                "{what}: {} bytes sent, bad block starts at {}",
                got.len(),
                b * BLOCK
            );
        } else if bad_block.is_none() {
            assert_eq!(
                status, 503,
                "{what}: a wrong-sized object fails before any byte"
            );
        }

        let sha = weightgate::util::sha256_hex(&good);
        // Quarantined before the client saw its transfer fail: the very next request is refused.
        let r = s
            .http
            .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "quarantined");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("model.safetensors")
        );

        // Audited (this round's event; earlier rounds left theirs) and the admins told.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let failures = loop {
            let found: Vec<Value> = s
                .audit()
                .into_iter()
                .filter(|e| e["kind"] == "integrity_failure")
                .collect();
            if let Some(e) = found.get(round) {
                break e.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no integrity_failure event"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await; // poll interval while waiting for the quarantine write
        };
        assert_eq!(failures["detail"]["sha256"], sha.as_str());
        let mails = s.wait_mail(round + 3).await;
        assert!(
            mails
                .iter()
                .any(|m| m.header("To").as_deref() == Some("ops@example.org")
                    && m.header("Subject").unwrap().contains("Integrity failure")),
            "{what}: admin mail"
        );

        // Re-importing the publisher's folder restores the bytes and lifts the quarantine.
        import_tiny(&s, &sample_files());
        let (status, got, failed) = fetch(&s, &token, "model.safetensors", None).await;
        assert_eq!(
            (status, failed, got == good),
            (200, false, true),
            "{what}: restored"
        );
        // Clear the audit trail expectation for the next round: count events so far.
        let n = s
            .audit()
            .iter()
            .filter(|e| e["kind"] == "integrity_failure")
            .count();
        assert_eq!(
            n,
            round + 1,
            "{what}: one integrity_failure event per incident"
        );
    }
}

async fn scrub_quarantines_and_releases(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let good = sample_files()[0].1.clone();
    let stored = stored_path(&s, &good);

    let clean = s.cli_json(&["models", "scrub", "acme/tiny"]);
    assert_eq!(clean["checked"], 3);
    assert_eq!(clean["ok"], 3);

    let mut bad = good.clone();
    bad[123_456] ^= 1;
    std::fs::write(&stored, &bad).unwrap();
    let out = s.cli(&["models", "scrub", "--json"]);
    assert_eq!(out.status.code(), Some(1), "a failed scrub exits 1");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["quarantined"].as_array().unwrap().len(), 1);
    assert!(
        report["quarantined"][0][1]
            .as_str()
            .unwrap()
            .contains("block 1")
    );
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // HEAD says so too.
    let r = s
        .http
        .head(s.url("/acme/tiny/resolve/main/model.safetensors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    // An admin puts the right bytes back; the next scrub releases the file.
    std::fs::write(&stored, &good).unwrap();
    let report = s.cli_json(&["models", "scrub", "acme/tiny"]);
    assert_eq!(report["restored"].as_array().unwrap().len(), 1);
    let (status, got, failed) = fetch(&s, &token, "model.safetensors", None).await;
    assert_eq!((status, failed, got == good), (200, false, true));
    let kinds: Vec<String> = s
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"quarantine_cleared".to_string()));
    assert_eq!(kinds.iter().filter(|k| *k == "scrub_completed").count(), 3);
}

/// With the default 8 MiB blocks a block is served as 128 KiB pieces, each checked against
/// its BLAKE3 subtree hash (stored at import, merged into the block hash before use): a bad
/// byte mid-block stops the transfer before its piece, the good pieces before it go out,
/// and the blob is quarantined as with whole blocks.
async fn a_bad_piece_mid_block_is_caught(backend: Backend) {
    const PIECE: usize = 128 << 10;
    let s = TestServer::start(backend).await;
    let good = pseudo_random(3 << 20, 7); // one block of 24 pieces
    import_tiny(&s, &[("model.safetensors", good.clone())]);
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;

    // Intact: whole and ranged, straddling piece edges.
    let (status, got, failed) = fetch(&s, &token, "model.safetensors", None).await;
    assert_eq!((status, failed), (200, false));
    assert!(got == good);
    let (status, got, _) =
        fetch(&s, &token, "model.safetensors", Some("bytes=131071-393217")).await;
    assert_eq!(status, 206);
    assert!(got == good[131071..=393217]);

    let bad_at = 2 * PIECE + PIECE / 2 + 3 * (1 << 20) / 2; // in the 15th piece
    let mut bad = good.clone();
    bad[bad_at] ^= 0x10;
    std::fs::write(stored_path(&s, &good), &bad).unwrap();
    // A range clear of the bad piece is served: every byte of it still checks out.
    let (status, got, failed) =
        fetch(&s, &token, "model.safetensors", Some("bytes=0-262143")).await;
    assert_eq!((status, failed), (206, false));
    assert!(got == good[..262144]);
    let (status, got, failed) = fetch(&s, &token, "model.safetensors", None).await;
    assert!(status == 200 && failed, "status {status}, failed {failed}");
    assert!(
        got.len() > PIECE,
        "good pieces of the block went out first ({} bytes)",
        got.len()
    );
    assert!(
        got.len() <= bad_at / PIECE * PIECE,
        "{} bytes sent, bad piece at {}",
        got.len(),
        bad_at / PIECE * PIECE
    );
    assert!(got == good[..got.len()]);
    let (status, _, _) = fetch(&s, &token, "model.safetensors", None).await;
    assert_eq!(status, 503, "quarantined");
    let kinds: Vec<Value> = s
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "integrity_failure")
        .collect();
    assert_eq!(kinds.len(), 1);
    assert!(
        kinds[0]["detail"].to_string().contains("block 0"),
        "{}",
        kinds[0]
    );
}

on_both_backends!(
    every_kind_of_damage_is_caught,
    scrub_quarantines_and_releases,
    a_bad_piece_mid_block_is_caught
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_manifests_and_sha256sums() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;

    // SHA256SUMS works with sha256sum -c on the downloaded files.
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/SHA256SUMS"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-repo-commit"].len(), 40);
    let sums = r.text().await.unwrap();
    assert_eq!(sums.lines().count(), 3);
    let out_dir = s.dir.path().join("download");
    for (path, _) in sample_files() {
        let enc: Vec<String> = path
            .split('/')
            .map(|p| {
                percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        let bytes = s
            .http
            .get(s.url(&format!("/acme/tiny/resolve/main/{}", enc.join("/"))))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let dest = out_dir.join(path);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
    std::fs::write(out_dir.join("SHA256SUMS"), &sums).unwrap();
    let check = std::process::Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&out_dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let ok = s.cli_json(&["verify", out_dir.to_str().unwrap()]);
    assert_eq!(ok["checked"], 3);
    assert_eq!(ok["bad"].as_array().unwrap().len(), 0);
    std::fs::write(out_dir.join("config.json"), b"tampered").unwrap();
    let out = s.cli(&["verify", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAILED config.json") && text.contains("2 of 3"),
        "{text}"
    );

    // The JSON manifest lists every file with its block hashes, and its JWS verifies with
    // nothing but the published JWKS.
    let manifest: Value = s
        .http
        .get(s.url("/api/v1/models/acme/tiny/manifest?revision=main"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let big = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "model.safetensors")
        .unwrap()
        .clone();
    assert_eq!(big["block_algo"], "blake3");
    assert_eq!(big["block_size"], 65536);
    let blocks = big["block_hashes"].as_array().unwrap();
    assert_eq!(blocks.len(), 5);
    let data = &sample_files()[0].1;
    assert_eq!(
        blocks[1],
        blake3::hash(&data[BLOCK..2 * BLOCK]).to_hex().as_str()
    );
    assert_eq!(big["sha256"], weightgate::util::sha256_hex(data).as_str());

    let jws = s
        .http
        .get(s.url("/api/v1/models/acme/tiny/manifest?format=jws"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = s
        .http
        .get(s.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(&jws).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let signed =
        jsonwebtoken::decode::<Value>(&jws, &key, &v).expect("signature verifies with the JWKS");
    assert_eq!(signed.claims["files"], manifest["files"]);
    let mut forged = jws.clone();
    forged.replace_range(
        jws.len() - 5..jws.len() - 4,
        if &jws[jws.len() - 5..jws.len() - 4] == "A" {
            "B"
        } else {
            "A"
        },
    );
    assert!(jsonwebtoken::decode::<Value>(&forged, &key, &v).is_err());

    let r = s
        .http
        .get(s.url("/api/v1/models/acme/tiny/manifest?revision=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .get(s.url("/api/v1/models/acme/tiny/manifest?format=xml"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A refused format (or revision) is refused before anything is logged: the log holds
    // only the reads that were served, with one of the two formats.
    let long = "x".repeat(20_000);
    for query in [format!("format={long}"), format!("revision={long}")] {
        let r = s
            .http
            .get(s.url(&format!("/api/v1/models/acme/tiny/manifest?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().len() < 1000);
    }
    // A read by commit, queued after those requests: once it is in the log, so is anything
    // they queued (the writer keeps the queue's order).
    let commit = s
        .http
        .get(s.url("/api/v1/models/acme/tiny/manifest"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["commit"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .http
        .get(s.url(&format!(
            "/api/v1/models/acme/tiny/manifest?revision={commit}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.wait_audit("the read by commit", |e| {
        e["kind"] == "manifest_read" && e["detail"]["revision"] == commit.as_str()
    })
    .await;
    let reads: Vec<_> = s
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "manifest_read")
        .collect();
    for e in &reads {
        let f = &e["detail"]["format"];
        assert!(f == "json" || f == "jws", "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_and_range_rules() {
    let s = server_with_model(Backend::Sqlite, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let data = sample_files()[0].1.clone();
    let sha = weightgate::util::sha256_hex(&data);
    let url = s.url("/acme/tiny/resolve/main/model.safetensors");
    let get = |h: &[(&str, String)]| {
        let mut r = s.http.get(&url).bearer_auth(&token);
        for (k, v) in h {
            r = r.header(*k, v);
        }
        r.send()
    };

    let r = get(&[]).await.unwrap();
    assert!(r.headers().contains_key("last-modified"));
    use base64::Engine;
    let digest = format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(hex::decode(&sha).unwrap())
    );
    assert_eq!(r.headers()["repr-digest"], digest.as_str());

    // If-None-Match with the ETag: 304, no body.
    let r = get(&[("If-None-Match", format!("\"{sha}\""))])
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = get(&[("If-None-Match", "\"something-else\"".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Repr-Digest is the whole file's digest, on a 206 too.
    let r = get(&[("Range", "bytes=10-19".into())]).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["repr-digest"], digest.as_str());
    // If-Range with the current ETag honours the range; with another validator, the whole file.
    let r = get(&[
        ("Range", "bytes=10-19".into()),
        ("If-Range", format!("\"{sha}\"")),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 206);
    let r = get(&[
        ("Range", "bytes=10-19".into()),
        ("If-Range", "\"old\"".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
    // A unit this server does not know is ignored (RFC 9110): the whole file.
    let r = get(&[("Range", "items=0-1".into())]).await.unwrap();
    assert_eq!(r.status(), 200);
    // Several ranges: the first one is served as a single 206.
    let r = get(&[("Range", "bytes=100-109, 200-209".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-109/{}", data.len()).as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &data[100..110]);
    // Unsatisfiable.
    let r = get(&[("Range", format!("bytes={}-", data.len()))])
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", data.len()).as_str()
    );

    // Audit outcomes and the blocks each fetch verified.
    let r = get(&[("Range", "bytes=65530-131080".into())])
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 65551);
    let partial = s
        .wait_audit("partial", |e| {
            e["outcome"] == "partial" && e["detail"]["range"] == "bytes=65530-131080"
        })
        .await;
    assert_eq!(partial["detail"]["blocks_verified"], 3);
    assert_eq!(partial["detail"]["first_block"], 0);
    let complete = s
        .wait_audit("complete", |e| {
            e["outcome"] == "complete" && e["detail"]["path"] == "model.safetensors"
        })
        .await;
    assert_eq!(complete["detail"]["blocks_verified"], 5);

    // Hanging up mid-transfer is recorded as aborted. The file is larger than the socket
    // buffers, so the server cannot have written all of it when the client leaves.
    let big = s.dir.path().join("big");
    write_model_dir(&big, &[("big.bin", pseudo_random(32 << 20, 3))]);
    s.cli_ok(&["models", "add", "acme/big", "--from", big.to_str().unwrap()]);
    let big_token = approved_token(&s, "acme/big", "bob@example.org").await;
    let mut r = s
        .http
        .get(s.url("/acme/big/resolve/main/big.bin"))
        .bearer_auth(&big_token)
        .send()
        .await
        .unwrap();
    let _ = r.chunk().await.unwrap(); // read a little, then hang up
    drop(r);
    s.wait_audit("aborted", |e| {
        e["outcome"] == "aborted_by_client" && e["detail"]["path"] == "big.bin"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_scrub_finds_damage_nobody_downloaded() {
    let scrub = [("WEIGHTGATE__INTEGRITY__SCRUB_INTERVAL", "200ms")];
    let s = TestServer::start_with(Backend::Sqlite, &[SMALL_BLOCKS, &scrub].concat()).await;
    import_tiny(&s, &sample_files());
    s.wait_audit("a clean scheduled scrub", |e| {
        e["kind"] == "scrub_completed" && e["detail"]["ok"] == 3
    })
    .await;
    let stored = stored_path(&s, &sample_files()[1].1);
    std::fs::write(&stored, b"{\"hidden_size\": 9}").unwrap(); // same size, other bytes
    let e = s
        .wait_audit("scrub quarantine", |e| e["kind"] == "integrity_failure")
        .await;
    assert_eq!(e["detail"]["path"], "config.json");
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let r = s
        .http
        .get(s.url("/acme/tiny/resolve/main/config.json"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}
