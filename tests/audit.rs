//! The audit log: tampering of every kind is detected, truncation is caught by checkpoints,
//! archives stay verifiable, concurrent writers keep one chain, and a server killed in the
//! middle of downloads loses no download a client saw complete.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Backend, TestServer, application, approved, approved_token, pseudo_random, server_with_model,
    write_model_dir,
};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weightgate::audit::{self, Event};

fn exec(s: &TestServer, backend: Backend, sql: &str) {
    match backend {
        Backend::Sqlite => common::sqlite(&s.db.url).batch_execute(sql).unwrap(),
        Backend::Postgres => PgConnection::establish(&s.db.url)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
    }
}

fn verify(s: &TestServer, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["audit", "verify", "--json"];
    args.extend_from_slice(extra);
    let out = s.cli(&args);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr))),
    )
}

/// A server with a few dozen events in its log.
async fn busy_server(backend: Backend) -> TestServer {
    let s = server_with_model(backend, "acme/tiny").await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    // One event each (a one-chunk download has no `started` event).
    for _ in 0..6 {
        s.http
            .get(s.url("/acme/tiny/resolve/main/config.json"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    s.http
        .get(s.url("/api/models/acme/tiny/tree/main?recursive=true"))
        .send()
        .await
        .unwrap();
    s.http
        .get(s.url("/api/v1/models/acme/tiny/manifest"))
        .send()
        .await
        .unwrap();
    s.wait_audit("the manifest read", |e| e["kind"] == "manifest_read")
        .await;
    s
}

async fn swapped_and_forged_rows_are_detected(backend: Backend) {
    let s = busy_server(backend).await;
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
    let rows = v["rows"].as_i64().unwrap();
    assert!(rows > 10);

    // Swap rows 3 and 4.
    exec(
        &s,
        backend,
        "UPDATE audit_events SET seq = -1 WHERE seq = 3; UPDATE audit_events SET seq = 3 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = -1;",
    );
    let (code, v) = verify(&s, &[]);
    assert_eq!((code, v["broken_at"].as_i64()), (1, Some(3)), "swap: {v}");
    exec(
        &s,
        backend,
        "UPDATE audit_events SET seq = -1 WHERE seq = 3; UPDATE audit_events SET seq = 3 WHERE seq = 4; UPDATE audit_events SET seq = 4 WHERE seq = -1;",
    );
    assert_eq!(verify(&s, &[]).0, 0, "swapping back restores the chain");

    // Insert a forged row after row 5, hashed correctly by the forger's own reckoning.
    let export = s.audit();
    let row5 = export.iter().find(|e| e["seq"] == 5).unwrap();
    let forged = weightgate::db::models::audit::AuditRow {
        seq: 6,
        ts_ms: row5["ts_ms"].as_i64().unwrap(),
        kind: "application_approved".into(),
        outcome: "ok".into(),
        actor: Some("admin:mallory".into()),
        model_id: Some("acme/tiny".into()),
        detail: "{}".into(),
        prev_hash: row5["hash"].as_str().unwrap().into(),
        hash: String::new(),
    };
    let hash = audit::row_hash(&forged);
    // Make room: shift every later row up by one (descending, so the primary key holds).
    for seq in (6..=rows).rev() {
        exec(
            &s,
            backend,
            &format!(
                "UPDATE audit_events SET seq = {} WHERE seq = {seq}",
                seq + 1
            ),
        );
    }
    exec(
        &s,
        backend,
        &format!(
            "INSERT INTO audit_events (seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash) VALUES (6, {}, 'application_approved', 'ok', 'admin:mallory', 'acme/tiny', '{{}}', '{}', '{hash}')",
            forged.ts_ms, forged.prev_hash
        ),
    );
    let (code, v) = verify(&s, &[]);
    assert_eq!(
        (code, v["broken_at"].as_i64()),
        (1, Some(7)),
        "forged insert: {v}"
    );
}

async fn checkpoints_catch_a_cut_tail_and_archives_stay_verifiable(backend: Backend) {
    let s = busy_server(backend).await;
    let cp_file = s.dir.path().join("checkpoints.jsonl");
    let cp_env = [(
        "WEIGHTGATE__AUDIT__CHECKPOINT_FILE",
        cp_file.to_str().unwrap(),
    )];
    let _ = cp_env;
    // `audit checkpoint` with the file configured for the CLI run.
    let out = Command::new(env!("CARGO_BIN_EXE_weightgate"))
        .args(["audit", "checkpoint"])
        .env_clear()
        .env("WEIGHTGATE__DATA_DIR", s.data_dir())
        .env("WEIGHTGATE__DATABASE__URL", &s.db.url)
        .env("WEIGHTGATE__AUDIT__CHECKPOINT_FILE", &cp_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp: Value = serde_json::from_slice(&out.stdout).unwrap();
    let head = cp["seq"].as_i64().unwrap();
    let cps = cp_file.to_str().unwrap();
    assert_eq!(verify(&s, &["--checkpoints", cps]).0, 0);

    // Cut the last two rows: the chain alone still verifies, the checkpoint does not.
    exec(
        &s,
        backend,
        &format!("DELETE FROM audit_events WHERE seq > {}", head - 2),
    );
    assert_eq!(verify(&s, &[]).0, 0, "a cut tail leaves a valid chain");
    let (code, v) = verify(&s, &["--checkpoints", cps]);
    assert_eq!(code, 1);
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .contains("tail was removed"),
        "{v}"
    );

    // Archive everything older than a moment from now: the archive verifies on its own, the
    // rest of the log links to it, and a wrong archive is refused.
    let (archive, before, lines) = archive_everything(&s, "audit-archive.jsonl");
    assert!(lines >= head - 2, "archived {lines}");
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["starts_after"][0].as_i64(), Some(lines), "{v}");
    let (code, v) = verify(&s, &["--archive", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["archive_rows"].as_i64(), Some(lines));
    let mut bad = std::fs::read_to_string(&archive).unwrap();
    bad = bad.replacen("\"outcome\":\"ok\"", "\"outcome\":\"ko\"", 1);
    let bad_path = s.dir.path().join("tampered-archive.jsonl");
    std::fs::write(&bad_path, bad).unwrap();
    assert_eq!(verify(&s, &["--archive", bad_path.to_str().unwrap()]).0, 1);
    let out = archive_before(&s, &before, &archive);
    assert!(!out.status.success(), "an archive is never overwritten");
}

/// `audit archive --before BEFORE --out OUT`.
fn archive_before(s: &TestServer, before: &str, out: &std::path::Path) -> std::process::Output {
    s.cli(&[
        "audit",
        "archive",
        "--before",
        before,
        "--out",
        out.to_str().unwrap(),
    ])
}

/// `audit archive` of every row older than a moment from now into the test's folder: the
/// archive's path, the `--before` given, and how many rows it took.
fn archive_everything(s: &TestServer, name: &str) -> (std::path::PathBuf, String, i64) {
    let archive = s.dir.path().join(name);
    let before = weightgate::util::rfc3339(weightgate::util::now() + 2);
    let out = archive_before(s, &before, &archive);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = std::fs::read_to_string(&archive).unwrap().lines().count() as i64;
    (archive, before, lines)
}

async fn concurrent_writers_keep_one_chain(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    // Two independent pools on the same database stand for two replicas.
    let replicas = [
        weightgate::db::Db::open(&s.settings).unwrap(),
        weightgate::db::Db::open(&s.settings).unwrap(),
    ];
    let before = verify(&s, &[]).1["rows"].as_i64().unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let db = replicas[w % 2].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let e = Event::new("test_event", "ok").detail(json!({"writer": w, "i": i}));
                if w % 4 < 2 {
                    db.write(move |c| audit::append(c, &[e])).await.unwrap();
                } else {
                    // The audit writer's way: on PostgreSQL the chain's lock comes with BEGIN.
                    let db = db.clone();
                    tokio::task::spawn_blocking(move || {
                        db.write_chain_blocking(|c| audit::append_locked(c, &[e]))
                    })
                    .await
                    .unwrap()
                    .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["rows"].as_i64().unwrap(), before + 200);
}

/// The download writer's batches, with rows appended in between and meanwhile by other
/// transactions and by another pool (a replica), and an archive of every row between two
/// batches, leave one valid chain. (It guards any caching of the chain's head in the writer:
/// a version that guessed the head without checking it failed this test on PostgreSQL.)
async fn the_writer_follows_appends_and_archives_between_its_batches(backend: Backend) {
    let s = server_with_model(backend, "acme/tiny").await;
    let other = weightgate::db::Db::open(&s.settings).unwrap();
    let (sink, _writer) = audit::AuditSink::start(
        weightgate::db::Db::open(&s.settings).unwrap(),
        64,
        1024,
        weightgate::config::Acknowledge::Commit,
        true,
        Default::default(),
    )
    .unwrap();
    let mine = |i: i64| Event::new("test_event", "ok").detail(json!({"writer": i}));
    let theirs = |i: i64| Event::new("test_event", "ok").detail(json!({"other": i}));
    let append_other = |i: i64| {
        let e = theirs(i);
        other.write(move |c| audit::append(c, &[e]))
    };
    let before = verify(&s, &[]).1["rows"].as_i64().unwrap();
    // Batches in a row, then one after another pool's append.
    for i in 0..3 {
        sink.log(mine(i)).await;
        sink.flush().await;
    }
    append_other(0).await.unwrap();
    sink.log(mine(3)).await;
    sink.flush().await;
    // Both at once.
    let ((), ()) = tokio::join!(
        async {
            for i in 4..40 {
                sink.log(mine(i)).await;
            }
            sink.flush().await;
        },
        async {
            for i in 1..21 {
                append_other(i).await.unwrap();
            }
        }
    );
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["rows"].as_i64().unwrap(), before + 40 + 21);

    // The writer's last batch, then another append, then an archive of every row: the next
    // batch must continue from the archive's own event.
    sink.log(mine(40)).await;
    sink.flush().await;
    append_other(21).await.unwrap();
    let (archive, _, archived) = archive_everything(&s, "archive.jsonl");
    assert_eq!(archived, before + 40 + 21 + 2);
    for i in 41..44 {
        sink.log(mine(i)).await;
        sink.flush().await;
    }
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["starts_after"][0].as_i64(), Some(archived), "{v}");
    // The archive's own `audit_archived` event, then the writer's three.
    assert_eq!(v["rows"].as_i64(), Some(4), "{v}");
    let (code, v) = verify(&s, &["--archive", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{v}");
}

/// Text that JSON has to escape (quotes, backslashes, control characters, NUL, characters
/// outside the BMP) is stored exactly as given, and the chain over it verifies.
async fn hostile_text_is_stored_exactly(backend: Backend) {
    use weightgate::db::models::audit as rows;
    let s = server_with_model(backend, "acme/tiny").await;
    let db = weightgate::db::Db::open(&s.settings).unwrap();
    let nasty = [
        "plain",
        "quote \" and backslash \\ and \\u0000 spelled out",
        "line\nbreak\ttab\r\u{1}\u{1f}\u{7f}",
        "\u{10348} \u{1F600} \u{202E}rtl \u{FEFF}bom",
        "{\"looks\":\"like json\"}",
        "",
    ];
    let batch = |with_nul: bool| -> Vec<Event> {
        nasty
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let actor = if with_nul && i == 1 {
                    format!("nul\u{0}{t}")
                } else {
                    format!("user:{t}")
                };
                Event::new("test_event", "ok")
                    .actor(actor)
                    .model(format!("m/{t}"))
                    .detail(json!({ "text": t, "n": i, "nested": [t, null, 1.5] }))
            })
            .collect()
    };
    let head = verify(&s, &[]).1["head_seq"].as_i64().unwrap();
    let mut expected = Vec::new();
    // PostgreSQL's text cannot hold a NUL at all (and no input reaches an event with one:
    // forms and paths refuse control characters), so only SQLite gets that batch.
    let passes: &[bool] = match backend {
        Backend::Sqlite => &[false, true],
        Backend::Postgres => &[false],
    };
    for &with_nul in passes {
        let events = batch(with_nul);
        expected.extend(events.clone());
        db.write(move |c| audit::append(c, &events)).await.unwrap();
    }
    let stored = db.read(move |c| rows::page(c, head, 100)).await.unwrap();
    assert_eq!(stored.len(), expected.len());
    for (row, e) in stored.iter().zip(&expected) {
        assert_eq!(row.kind, e.kind);
        assert_eq!(row.ts_ms, e.ts_ms);
        assert_eq!(row.actor, e.actor, "row {}", row.seq);
        assert_eq!(row.model_id, e.model_id, "row {}", row.seq);
        assert_eq!(row.detail, e.detail, "row {}", row.seq);
        assert_eq!(row.hash, audit::row_hash(row), "row {}", row.seq);
    }
    let (code, v) = verify(&s, &[]);
    assert_eq!(code, 0, "{v}");
}

async fn events_cover_reads_withdrawals_and_filters(backend: Backend) {
    let s = busy_server(backend).await;
    let r = s
        .http
        .post(s.url("/api/v1/models/acme/tiny/applications"))
        .json(&application("eve@example.org"))
        .send()
        .await
        .unwrap();
    let status_url = r.json::<Value>().await.unwrap()["status_url"]
        .as_str()
        .unwrap()
        .to_string();
    let withdraw = status_url
        .replacen("/applications/", "/api/v1/applications/", 1)
        .replacen("?key=", "/withdraw?key=", 1);
    let r = s.http.post(&withdraw).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "withdrawn");
    assert_eq!(s.http.post(&withdraw).send().await.unwrap().status(), 409);
    let kinds: Vec<String> = s
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "tree_read",
        "manifest_read",
        "application_withdrawn",
        "file_download",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k}");
    }
    // Filters, on the CLI and in the admin API.
    let only: Vec<Value> = s
        .cli_ok(&[
            "audit",
            "export",
            "--model",
            "acme/tiny",
            "--since",
            "2000-01-01",
        ])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!only.is_empty() && only.iter().all(|e| e["model"] == "acme/tiny"));
    let none = s.cli_ok(&["audit", "export", "--since", "2999-01-01"]);
    assert!(none.trim().is_empty());
    let csv = s.cli_ok(&["audit", "export", "--format", "csv", "--model", "acme/tiny"]);
    assert!(csv.starts_with("seq,ts,kind,"));
    assert_eq!(csv.lines().count(), only.len() + 1);

    assert!(
        !s.cli(&["admin", "create", "--email", "root@example.org"])
            .status
            .success(),
        "an empty password is refused"
    );
    let admin = common::admin_token(&s);
    let mut url = s.url("/api/v1/admin/audit?model=acme/tiny&limit=5");
    let mut got = Vec::new();
    loop {
        let r = s.http.get(&url).bearer_auth(&admin).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let next = r.headers().get("link").map(|l| {
            l.to_str()
                .unwrap()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_string()
        });
        got.extend(
            r.text()
                .await
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
        match next {
            Some(n) => url = n,
            None => break,
        }
    }
    assert!(
        got.len() >= only.len(),
        "pages add up ({} vs {})",
        got.len(),
        only.len()
    );
    let r = s
        .http
        .get(s.url("/api/v1/admin/audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .get(s.url(&format!("/api/v1/admin/audit?token={admin}")))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(r.status().as_u16(), 400 | 401),
        "an admin token is never taken from the URL"
    );
}

/// `audit.downloads = false` (for measuring what auditing costs): downloads leave no rows
/// in the chain, other events still do, and a token's quota is still counted.
async fn download_auditing_can_be_turned_off(backend: Backend) {
    let s = common::server_with_model_and(
        backend,
        "acme/tiny",
        &[("WEIGHTGATE__AUDIT__DOWNLOADS", "false")],
    )
    .await;
    approved(&s, "acme/tiny", "ada@example.org").await;
    let token = common::quota_token(&s, "ada@example.org", "acme/tiny", 1);
    let get = |path: &str| s.http.get(s.url(path)).bearer_auth(&token).send();
    let r = get("/acme/tiny/resolve/main/config.json").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        &r.bytes().await.unwrap()[..],
        &common::sample_files()[1].1[..]
    );
    // The quota still counts the file: a second, different one is refused...
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get("/acme/tiny/resolve/main/model.safetensors")
            .await
            .unwrap();
        if r.status() == 403 {
            assert_eq!(r.json::<Value>().await.unwrap()["error"], "quota_exhausted");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the quota never counted the first file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll for the delivery record
    }
    // ...while the first stays free.
    assert_eq!(
        get("/acme/tiny/resolve/main/config.json")
            .await
            .unwrap()
            .status(),
        200
    );
    let events = s.audit();
    assert!(
        events.iter().any(|e| e["kind"] == "token_issued"),
        "other events are still logged"
    );
    let downloads: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "file_download" || e["kind"] == "file_head")
        .collect();
    assert!(
        downloads.is_empty(),
        "download events were logged: {downloads:?}"
    );
    assert_eq!(verify(&s, &[]).0, 0, "the chain is intact");
}

/// The value of a metric on /metrics.
async fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s.metrics().await;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Polls a metric until `ok` holds (the writer and the handlers run on their own).
async fn metric_until(s: &TestServer, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = metric(s, name).await;
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval for the metric
    }
}

/// Stalls the audit writer until the returned connection is dropped: it holds SQLite's write
/// lock, or PostgreSQL's chain lock.
fn stall_writer(s: &TestServer, backend: Backend) -> Box<dyn SimpleConnection + Send> {
    match backend {
        Backend::Sqlite => {
            let mut c = common::sqlite(&s.db.url);
            c.batch_execute("BEGIN IMMEDIATE").unwrap();
            Box::new(c)
        }
        Backend::Postgres => {
            let mut c = PgConnection::establish(&s.db.url).unwrap();
            c.batch_execute("SELECT pg_advisory_lock(7745321)").unwrap();
            Box::new(c)
        }
    }
}

/// Rows in `open_downloads` (downloads with a `started` event and no end yet).
fn open_downloads(s: &TestServer, backend: Backend) -> i64 {
    use diesel::RunQueryDsl;
    let q = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "(SELECT COUNT(*) FROM open_downloads)",
    ));
    match backend {
        Backend::Sqlite => q.get_result(&mut common::sqlite(&s.db.url)).unwrap(),
        Backend::Postgres => q
            .get_result(&mut PgConnection::establish(&s.db.url).unwrap())
            .unwrap(),
    }
}

/// With `audit.acknowledge = "queue"`, a download ends once its final event is queued, not
/// committed: downloads complete while the writer is stalled, until the queue is full; then
/// they wait for room like any logged request. One whose client resets the connection
/// meanwhile has queued nothing of its own ending, so its body records it, closing the
/// download its `started` event opened; every event reaches the chain once the writer
/// resumes.
async fn queued_acknowledgements_end_downloads_before_the_commit(backend: Backend) {
    let s = common::server_with_model_and(
        backend,
        "acme/tiny",
        &[
            ("WEIGHTGATE__AUDIT__ACKNOWLEDGE", "queue"),
            ("WEIGHTGATE__AUDIT__QUEUE_MAX", "2"),
            // model.safetensors (300 kB) goes out in many chunks, the last one held.
            common::SMALL_BLOCKS[0],
            common::SMALL_BLOCKS[1],
        ],
    )
    .await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let before = s.audit().len();
    let hold = stall_writer(&s, backend);
    let url = s.url("/acme/tiny/resolve/main/config.json");
    let want = &common::sample_files()[1].1;
    let get = || {
        let (http, url, token) = (s.http.clone(), url.clone(), token.clone());
        tokio::spawn(async move {
            let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        })
    };
    // Two downloads complete, whole, while nothing can be committed.
    for _ in 0..2 {
        let (status, body) = tokio::time::timeout(Duration::from_secs(15), get())
            .await
            .expect("a download waited for the stalled writer")
            .unwrap();
        assert_eq!((status, &body[..]), (200, &want[..]));
    }
    assert_eq!(metric(&s, "weightgate_audit_queued").await, 2);
    // The queue is full: the next downloads wait for room. A one-chunk download waits
    // before its headers; a long one sends all but its last chunk, then waits, and its
    // client resets the connection.
    let patient = get();
    let host = url["http://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut leaving = tokio::net::TcpStream::connect(&host).await.unwrap();
    let request = format!(
        "GET /acme/tiny/resolve/main/model.safetensors HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    leaving.write_all(request.as_bytes()).await.unwrap();
    let (mut got, mut buf) = (0, vec![0u8; 65536]);
    while got < 300_000 - 16384 {
        let n = leaving.read(&mut buf).await.unwrap();
        assert!(n > 0, "the long download ended early");
        got += n;
    }
    metric_until(&s, "weightgate_audit_queue_full_total", |n| n >= 2).await;
    assert!(!patient.is_finished());
    // The finished bodies counted their block as they were dropped (one each); the leaving
    // one counts its blocks once the server has seen the reset and dropped it.
    metric_until(&s, "weightgate_blocks_verified_total", |n| n == 2).await;
    leaving.set_zero_linger().unwrap(); // closing sends a reset
    drop(leaving);
    metric_until(&s, "weightgate_blocks_verified_total", |n| n > 2).await;
    drop(hold);
    let (status, body) = tokio::time::timeout(Duration::from_secs(15), patient)
        .await
        .expect("still waiting for room")
        .unwrap();
    assert_eq!((status, &body[..]), (200, &want[..]));
    // Three complete downloads, and the one that left: started, then aborted.
    s.wait_audit("the reset download", |e| {
        e["kind"] == "file_download" && e["outcome"] == "aborted_by_client"
    })
    .await;
    let outcomes: Vec<(String, Value)> = s.audit()[before..]
        .iter()
        .filter(|e| e["kind"] == "file_download")
        .map(|e| {
            (
                e["outcome"].as_str().unwrap_or("").to_string(),
                e["detail"]["reason"].clone(),
            )
        })
        .collect();
    let complete = outcomes.iter().filter(|(o, _)| o == "complete").count();
    assert_eq!(complete, 3, "{outcomes:?}");
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert!(outcomes.iter().any(|(o, _)| o == "started"), "{outcomes:?}");
    assert!(
        outcomes.contains(&(
            "aborted_by_client".into(),
            json!("closed before the last chunk was delivered")
        )),
        "{outcomes:?}"
    );
    assert_eq!(open_downloads(&s, backend), 0, "no download is left open");
    assert_eq!(verify(&s, &[]).0, 0, "the chain is intact");
}

/// Requests that are logged without holding their response (here denied downloads, which
/// need no token) wait for room once `audit.queue_max` of their events are queued, so a flood
/// of them cannot grow the writer's queue; a request waiting for room has queued nothing,
/// and nothing queued is lost when the writer resumes.
async fn a_full_audit_queue_slows_requests_down(backend: Backend) {
    let s = common::server_with_model_and(
        backend,
        "acme/tiny",
        &[("WEIGHTGATE__AUDIT__QUEUE_MAX", "2")],
    )
    .await;
    let before = s.audit().len();
    let hold = stall_writer(&s, backend);
    let url = s.url("/acme/tiny/resolve/main/config.json");
    // Two denials fill the queue and are answered at once.
    for _ in 0..2 {
        let r = s.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    assert_eq!(metric(&s, "weightgate_audit_queued").await, 2);
    // The next ones wait for room: one patient client, and three that will give up.
    let send = || {
        let (http, url) = (s.http.clone(), url.clone());
        tokio::spawn(async move { http.get(&url).send().await.unwrap().status() })
    };
    let patient = send();
    let impatient: Vec<_> = (0..3).map(|_| send()).collect();
    // All four are now waiting for room (each counts itself just before it waits).
    metric_until(&s, "weightgate_audit_queue_full_total", |n| n >= 4).await;
    for r in impatient.iter().chain([&patient]) {
        assert!(
            !r.is_finished(),
            "a request was answered while the audit queue was full"
        );
    }
    for r in &impatient {
        r.abort(); // the client leaves
    }
    // Waiting for room queued nothing.
    assert_eq!(metric(&s, "weightgate_audit_queued").await, 2);
    drop(hold); // rolls back / unlocks: the writer goes on
    let answered = tokio::time::timeout(Duration::from_secs(15), patient).await;
    assert_eq!(answered.expect("still waiting for room").unwrap(), 401);
    metric_until(&s, "weightgate_audit_queued", |n| n == 0).await;
    let events = s.audit();
    let denied = events[before..]
        .iter()
        .filter(|e| e["kind"] == "file_download" && e["outcome"] == "denied")
        .count();
    // The two, the patient one, and any of the three the server finished after their
    // clients left.
    assert!((3..=6).contains(&denied), "{denied} denials logged");
    assert_eq!(verify(&s, &[]).0, 0, "the chain is intact");
}

/// While the database cannot take a download's final event, the download waits at most
/// `audit.ack_timeout_secs`: one that fits in one read is answered 503 before any byte leaves,
/// a longer one is cut before its last bytes. Once the log takes events again, each has its
/// final event and, after it, the record of the failure; the chain is intact.
async fn downloads_give_up_on_a_stalled_log(backend: Backend) {
    let s = common::server_with_model_and(
        backend,
        "acme/tiny",
        &[("WEIGHTGATE__AUDIT__ACK_TIMEOUT_SECS", "1")],
    )
    .await;
    let token = approved_token(&s, "acme/tiny", "ada@example.org").await;
    let url = |path: &str| s.url(&format!("/acme/tiny/resolve/main/{path}"));
    // Warm the token cache, so that nothing but the log waits below.
    let r = s.http.get(url("config.json")).bearer_auth(&token);
    assert_eq!(r.send().await.unwrap().status(), 200);
    let hold = stall_writer(&s, backend);

    // Without the limit, these would wait until the log takes events again.
    let patience = Duration::from_secs(15);
    let asked = Instant::now();
    let r = s.http.get(url("config.json")).bearer_auth(&token);
    let r = tokio::time::timeout(patience, r.send()).await;
    let r = r.expect("still waiting for the log").unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "answered before the wait ran out"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "audit_unavailable"
    );

    // model.safetensors goes out in 16 KiB reads: all but the last leave, then it is cut.
    let asked = Instant::now();
    let r = s.http.get(url("model.safetensors")).bearer_auth(&token);
    let mut r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0;
    let cut = loop {
        let chunk = tokio::time::timeout(patience, r.chunk()).await;
        match chunk.expect("still waiting for the log") {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(cut && got < 300_000, "{got} bytes, cut: {cut}");
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "cut before the wait ran out"
    );

    drop(hold);
    for (path, status) in [("config.json", 503), ("model.safetensors", 200)] {
        let failed = |e: &Value| {
            e["outcome"] == "error"
                && e["detail"]["reason"] == "audit_unavailable"
                && e["detail"]["path"] == path
        };
        let failure = s.wait_audit("the recorded failure", failed).await;
        let events = s.downloads_of(path);
        let at = events.iter().position(failed).unwrap();
        let last = &events[at.checked_sub(1).expect("an event before the failure")];
        // The final event the download queued came first, for the same download.
        assert_eq!(last["outcome"], "complete", "{path}: {last}");
        assert_eq!(last["detail"]["download"], failure["detail"]["download"]);
        assert_eq!(failure["detail"]["status"], status, "{path}");
    }
    assert_eq!(verify(&s, &[]).0, 0, "the chain is intact");

    // With queued acknowledgements, a download that waits for room in a full queue has
    // queued nothing when its wait runs out: the failure is its only record.
    let q = common::server_with_model_and(
        backend,
        "acme/tiny",
        &[
            ("WEIGHTGATE__AUDIT__ACK_TIMEOUT_SECS", "1"),
            ("WEIGHTGATE__AUDIT__ACKNOWLEDGE", "queue"),
            ("WEIGHTGATE__AUDIT__QUEUE_MAX", "1"),
        ],
    )
    .await;
    let token = approved_token(&q, "acme/tiny", "ada@example.org").await;
    let url = q.url("/acme/tiny/resolve/main/config.json");
    let r = q.http.get(&url).bearer_auth(&token);
    assert_eq!(r.send().await.unwrap().status(), 200);
    let hold = stall_writer(&q, backend);
    // A denial takes the queue's one place, and keeps it while the writer is stalled.
    assert_eq!(q.http.get(&url).send().await.unwrap().status(), 401);
    let r = q.http.get(&url).bearer_auth(&token);
    let r = tokio::time::timeout(patience, r.send()).await;
    assert_eq!(r.expect("still waiting for room").unwrap().status(), 503);
    drop(hold);
    let failure = q
        .wait_audit("the failure", |e| {
            e["outcome"] == "error" && e["detail"]["reason"] == "audit_unavailable"
        })
        .await;
    let ends = q
        .audit()
        .into_iter()
        .filter(|e| {
            e["kind"] == "file_download" && e["detail"]["download"] == failure["detail"]["download"]
        })
        .count();
    assert_eq!(ends, 1, "the download has one record");
    assert_eq!(verify(&q, &[]).0, 0, "the chain is intact");
}

/// An empty file is a download like any other: actix sends no body for `Content-Length: 0`
/// (and never polls one), so its final event is committed before the headers leave.
async fn an_empty_download_is_recorded_complete(backend: Backend) {
    let s = TestServer::start(backend).await;
    let src = s.dir.path().join("src");
    common::write_model_dir(&src, &[("empty.txt", Vec::new()), ("a.txt", b"a".to_vec())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/empty",
        "--from",
        src.to_str().unwrap(),
    ]);
    let token = approved_token(&s, "acme/empty", "ada@example.org").await;
    let r = s
        .http
        .get(s.url("/acme/empty/resolve/main/empty.txt"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    // Committed before the answer: it is in the log already.
    let ended = s.downloads_of("empty.txt");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["outcome"], "complete");
    assert_eq!(ended[0]["detail"]["bytes_sent"], 0);
}

on_both_backends!(
    an_empty_download_is_recorded_complete,
    downloads_give_up_on_a_stalled_log,
    a_full_audit_queue_slows_requests_down,
    queued_acknowledgements_end_downloads_before_the_commit,
    download_auditing_can_be_turned_off,
    swapped_and_forged_rows_are_detected,
    checkpoints_catch_a_cut_tail_and_archives_stay_verifiable,
    concurrent_writers_keep_one_chain,
    the_writer_follows_appends_and_archives_between_its_batches,
    hostile_text_is_stored_exactly,
    events_cover_reads_withdrawals_and_filters,
);

/// Kills the server with SIGKILL in the middle of a batch of downloads, starts it again, and
/// checks that every download a client saw complete is in the log, and that the cut ones are
/// recorded as aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_completed_download() {
    let mut s = TestServer::start_with(Backend::Sqlite, common::SMALL_BLOCKS).await;
    let src = s.dir.path().join("src");
    // Larger than loopback socket buffers can absorb, so a held download stays open.
    let big = pseudo_random(32 << 20, 3);
    write_model_dir(&src, &[("model.safetensors", big.clone())]);
    s.cli_ok(&[
        "models",
        "add",
        "acme/tiny",
        "--from",
        src.to_str().unwrap(),
    ]);
    let (token, _) = approved(&s, "acme/tiny", "ada@example.org").await;
    s.stop().await;

    let spawn = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weightgate"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WEIGHTGATE__DATA_DIR", s.data_dir())
            .env("WEIGHTGATE__DATABASE__URL", &s.db.url)
            .env("WEIGHTGATE__SERVER__BIND", "127.0.0.1:0")
            .env("WEIGHTGATE__SERVER__PUBLIC_URL", &s.base)
            .env("WEIGHTGATE__STORAGE__CHUNK_SIZE", "16384")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line
                    .strip_prefix("weightgate listening on ")
                    .and_then(|r| r.split_whitespace().next())
                {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server start");
        (child, format!("http://{addr}"))
    };
    let (mut child, base) = spawn();
    let http = reqwest::Client::new();
    // 40 downloads, each of its own range so the log can tell them apart; half of them stop
    // reading after one chunk until the kill (`hold` is closed then).
    let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let (http, url, token, hold) = (
            http.clone(),
            format!("{base}/acme/tiny/resolve/main/model.safetensors"),
            token.clone(),
            hold.clone(),
        );
        // The held (odd) ones ask for the rest of the file, the others for 100 kB.
        let range = if i % 2 == 1 {
            format!("bytes={}-", i * 1000)
        } else {
            format!("bytes={}-{}", i * 1000, i * 1000 + 99_999)
        };
        tasks.push(tokio::spawn(async move {
            let Ok(mut r) = http
                .get(&url)
                .bearer_auth(&token)
                .header("Range", &range)
                .send()
                .await
            else {
                return (range, false);
            };
            let want = r.content_length().unwrap_or(u64::MAX);
            let mut got = 0u64;
            loop {
                match r.chunk().await {
                    Ok(Some(c)) => {
                        got += c.len() as u64;
                        if i % 2 == 1 {
                            // Half the clients stop reading after their first chunk until the
                            // kill, so the kill is sure to find them mid-body.
                            let _ = hold.acquire().await;
                        }
                    }
                    Ok(None) => return (range, got == want),
                    Err(_) => return (range, false),
                }
            }
        }));
    }
    // Kill once some downloads have completed (and others have not).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tasks.iter().any(|t| t.is_finished()) {
        assert!(Instant::now() < deadline, "no download finished");
        tokio::time::sleep(Duration::from_millis(5)).await; // poll until a download completes
    }
    // ...and once the log holds a download that has started but not ended (its `started` row
    // is queued as its first chunk leaves, and committed with the next batch).
    let open_in_log = || {
        let events = s.audit();
        events.iter().any(|e| {
            e["outcome"] == "started"
                && !events.iter().any(|f| {
                    f["outcome"] != "started" && f["detail"]["download"] == e["detail"]["download"]
                })
        })
    };
    while !open_in_log() {
        assert!(Instant::now() < deadline, "no download was open in the log");
        tokio::time::sleep(Duration::from_millis(5)).await; // poll for the committed row
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    hold.close();
    let mut completed = Vec::new();
    for t in tasks {
        let (range, ok) = t.await.unwrap();
        if ok {
            completed.push(range);
        }
    }
    assert!(!completed.is_empty());

    // Start again: the server records the downloads it left open as aborted.
    let (mut child, base) = spawn();
    // Ready means recovery has run (the listener is bound before it, requests wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the restarted server never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // readiness poll
    }
    let events = s.audit();
    child.kill().unwrap();
    child.wait().unwrap();
    for range in &completed {
        assert!(
            events.iter().any(|e| e["kind"] == "file_download"
                && e["outcome"] == "partial"
                && e["detail"]["range"] == range.as_str()),
            "{range} completed for its client but is not in the log"
        );
    }
    let started = events.iter().filter(|e| e["outcome"] == "started").count();
    let ended = events
        .iter()
        .filter(|e| {
            e["kind"] == "file_download"
                && ["partial", "complete", "aborted", "aborted_by_client"]
                    .contains(&e["outcome"].as_str().unwrap_or(""))
        })
        .count();
    assert_eq!(
        started, ended,
        "every started download has an end in the log"
    );
    assert!(
        events
            .iter()
            .any(|e| e["outcome"] == "aborted" && e["detail"]["reason"] == "server_stopped"),
        "the kill cut some downloads off, and the restart recorded them"
    );
    assert!(
        verify(&s, &[]).0 == 0,
        "the chain is intact after the crash"
    );
}
