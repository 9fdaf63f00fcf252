//! `GET`/`HEAD /{org}/{name}/resolve/{revision}/{path}`: the gate in front of every weight
//! byte. Parse → authorize → stream verified blocks, and one audit event per request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use bytes::Bytes;
use futures_util::Stream;

use crate::State;
use crate::audit::{Ack, AuditSink, Event, Track};
use crate::auth::access::Principal;
use crate::db::models::catalog::{self, BLOB_QUARANTINED, Blob, FileRow};
use crate::db::models::tokens::Delivered;
use crate::error::{Error, HubCode, Result};
use crate::storage::upstream::BLOB_REMOTE;
use crate::storage::verify::{self, Chunks, Failure, Plan};
use crate::{paths, util};

/// What is known about a fetch so far; becomes its audit event.
#[derive(Debug, Clone, Default)]
struct FetchLog {
    method: String,
    model: Option<String>,
    revision: Option<String>,
    commit: Option<String>,
    path: Option<String>,
    user: Option<String>,
    jti: Option<String>,
    range: Option<String>,
    client: Option<String>,
    status: u16,
    expected: u64,
}

/// Most bytes of a request's Range header written to its audit event.
const MAX_LOGGED_RANGE: usize = 128;

/// The detail of a download event: a struct rather than a `json!` map (this is built for
/// every request), its fields in sorted order so that the text is the same as the map's.
#[derive(serde::Serialize)]
struct FetchDetail<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    blocks_verified: Option<u64>,
    bytes_expected: u64,
    bytes_sent: u64,
    client: Option<&'a str>,
    commit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    download: Option<&'a str>,
    duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_block: Option<u64>,
    jti: Option<&'a str>,
    path: Option<&'a str>,
    range: Option<&'a str>,
    reason: Option<&'a str>,
    revision: Option<&'a str>,
    status: u16,
    user: Option<&'a str>,
}

/// What a stream adds to its events: its id, and for its final event the blocks it covered.
#[derive(Default, Clone, Copy)]
struct StreamDetail<'a> {
    download: Option<&'a str>,
    /// `(first_block, blocks_verified)`.
    blocks: Option<(u64, u64)>,
}

impl FetchLog {
    fn event(
        &self,
        outcome: &'static str,
        bytes_sent: u64,
        started: Instant,
        reason: Option<&str>,
    ) -> Event {
        self.stream_event(
            outcome,
            bytes_sent,
            started,
            reason,
            StreamDetail::default(),
        )
    }

    fn stream_event(
        &self,
        outcome: &'static str,
        bytes_sent: u64,
        started: Instant,
        reason: Option<&str>,
        stream: StreamDetail<'_>,
    ) -> Event {
        let kind = if self.method == "HEAD" {
            "file_head"
        } else {
            "file_download"
        };
        let detail = FetchDetail {
            blocks_verified: stream.blocks.map(|b| b.1),
            bytes_expected: self.expected,
            bytes_sent,
            client: self.client.as_deref(),
            commit: self.commit.as_deref(),
            download: stream.download,
            duration_ms: started.elapsed().as_millis() as u64,
            first_block: stream.blocks.map(|b| b.0),
            jti: self.jti.as_deref(),
            path: self.path.as_deref(),
            // A Range header may list many ranges (only the first is served): keep its start.
            range: self
                .range
                .as_deref()
                .map(|r| crate::util::clip(r, MAX_LOGGED_RANGE)),
            reason,
            revision: self.revision.as_deref(),
            status: self.status,
            user: self.user.as_deref(),
        };
        let mut e = Event::new(kind, outcome).detail_of(&detail);
        e.model_id = self.model.clone();
        if let Some(u) = &self.user {
            e = e.actor(format!("user:{u}"));
        }
        e
    }
}

pub async fn resolve(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse> {
    let started = Instant::now();
    let mut log = FetchLog {
        method: req.method().to_string(),
        client: req.peer_addr().map(|a| a.ip().to_string()),
        ..Default::default()
    };
    // Boxed: `serve`'s future is several KiB, and a profile showed the handler's future
    // being copied in actix's request dispatch; boxed, what is copied is small.
    match Box::pin(serve(&req, &state, &mut log, started)).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            log.status = e.status.as_u16();
            let outcome = match e.code {
                "quarantined" => "integrity_failure",
                "storage_unavailable" | "internal" | "database_unavailable" => "error",
                _ => "denied",
            };
            state
                .audit
                .log(log.event(outcome, 0, started, Some(e.code)))
                .await;
            Err(e)
        }
    }
}

async fn serve(
    req: &HttpRequest,
    state: &web::Data<State>,
    log: &mut FetchLog,
    started: Instant,
) -> Result<HttpResponse> {
    // The raw path keeps %2F inside the revision segment distinct from a real '/'.
    let raw = req.uri().path();
    let mut parts = raw.splitn(5, '/');
    let (_, org, name, _, tail) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    );
    let (org, name, tail) = match (org, name, tail) {
        (Some(o), Some(n), Some(t)) => (paths::decode(o, "org")?, paths::decode(n, "name")?, t),
        _ => {
            return Err(Error::bad_request(
                "bad_path",
                "expected /{org}/{name}/resolve/{revision}/{path}",
            ));
        }
    };
    let model = format!("{org}/{name}");
    paths::validate_repo_id(&model).map_err(|_| repo_not_found(&model))?;
    log.model = Some(model.clone());
    let (revision, path) = paths::split_resolve_tail(tail)?;
    log.revision = Some(revision.clone());
    log.path = Some(path.clone());

    let resolved = resolve_path(state, &model, &revision, &path).await?;
    let commit = &resolved.commit;
    log.commit = Some(commit.clone());
    let Some((file, blob)) = &resolved.found else {
        if path == SUMS_FILE {
            return sha256sums(state, &model, commit, resolved.modified).await;
        }
        return Err(Error::not_found(
            "entry_not_found",
            format!("File {path} does not exist in revision {revision} of model {model}."),
        )
        .hub(HubCode::EntryNotFound)
        .with_header(HeaderName::from_static("x-repo-commit"), commit.clone()));
    };
    // Replaced by a fresh copy once an upstream fill completes.
    let mut blob = std::borrow::Cow::Borrowed(blob);

    // A bearer token (header or ?token=) wins; otherwise a signed link (?link=).
    let bearer = super::bearer(req);
    // The query string is parsed only when there is no bearer token.
    let link = bearer
        .is_none()
        .then(|| super::query_param(req, "link"))
        .flatten();
    let principal = match link {
        Some(link) => {
            state
                .gate
                .authorize_link(&link, &model, commit, &path)
                .await?
        }
        None => state.gate.authorize(bearer.as_deref(), &model).await?,
    };
    log.user = Some(principal.user_id.clone());
    log.jti = Some(principal.jti.clone());

    if blob.status == BLOB_QUARANTINED {
        return Err(withheld(&model, &path));
    }

    let quota_left = if req.method() == Method::GET {
        state
            .gate
            .check_quota(&principal, &blob.sha256, &model)
            .await?
    } else {
        None
    };

    let size = blob.size as u64;
    let mut resp = HttpResponse::build(StatusCode::OK);
    if let Some(left) = quota_left {
        resp.insert_header(("X-Weightgate-Quota-Remaining", left.to_string()));
    }
    for (name, value) in &resolved.headers {
        resp.insert_header((name.clone(), value.clone()));
    }
    expiry_warning(&mut resp, &principal, &model);
    if etag_matches(req, &blob.sha256) {
        log.status = 304;
        state
            .audit
            .log(log.event("not_modified", 0, started, None))
            .await;
        return Ok(resp.status(StatusCode::NOT_MODIFIED).finish());
    }

    let range = byte_range(req, &blob, size)?;
    log.range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (start, end) = range.unwrap_or((0, size));
    if let Some((s, e)) = range {
        resp.status(StatusCode::PARTIAL_CONTENT);
        resp.insert_header((header::CONTENT_RANGE, format!("bytes {s}-{}/{size}", e - 1)));
    }
    let len = end - start;
    log.status = if range.is_some() { 206 } else { 200 };
    log.expected = len;

    if req.method() == Method::HEAD {
        state.audit.log(log.event("ok", 0, started, None)).await;
        // An empty body whose declared size is the file's, so Content-Length is exact.
        return Ok(resp
            .no_chunking(len)
            .streaming(futures_util::stream::empty::<Result<Bytes, Error>>()));
    }

    if blob.status == BLOB_REMOTE {
        // Not cached yet: pull it through from the upstream.
        let up = state.store.upstream.clone().ok_or_else(|| {
            Error::unavailable("storage_unavailable", "This file is not in storage.")
        })?;
        let block_size = state.settings.storage.block_size;
        // An empty file is filled first like a range: actix never polls a body of length 0,
        // so a streamed one could not commit its final event.
        if range.is_none() && size > 0 {
            // The whole file: stream it to the client while the cache fills.
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (st, b) = (state.clone(), blob.clone().into_owned());
            tokio::spawn(async move {
                let _ = up.fill(&st.store, &st.db, &b, block_size, Some(tx)).await;
            });
            let chunks = Chunks {
                rx,
                blocks_verified: Default::default(),
                first_block: 0,
            };
            let delivery = Delivery {
                state: state.clone(),
                jti: principal.jti.clone(),
                sha256: blob.sha256.clone(),
                path: file.path.clone(),
                size,
                start,
            };
            let body = AuditedBody::new(
                util::random_hex(12),
                delivery,
                None,
                chunks,
                log.clone(),
                started,
                state.audit.clone(),
            );
            return Ok(resp.no_chunking(len).streaming(body));
        }
        // A range: fill the cache first, then serve the range verified as usual.
        up.fill(&state.store, &state.db, &blob, block_size, None)
            .await?;
        let sha = blob.sha256.clone();
        blob = std::borrow::Cow::Owned(
            state
                .db
                .read(move |c| catalog::find_blob(c, &sha))
                .await?
                .ok_or_else(|| Error::internal("filled blob vanished"))?,
        );
    }
    let plan = Plan {
        key: blob.storage_key.clone(),
        size,
        block_size: blob.block_size as u64,
        block_hashes: blob.block_hashes.clone(),
        piece_hashes: piece_cvs(state, &blob).await,
        range: start..end,
        chunk_size: state.settings.storage.chunk_size,
        share: true,
    };
    let on_failure = quarantine_on_failure(
        state.clone(),
        model.clone(),
        file.path.clone(),
        blob.sha256.clone(),
    );
    let mut chunks = verify::stream(state.store.clone(), plan, on_failure);
    // Nothing has been sent yet: when the first read (a block, or the first pieces of one)
    // fails, answer with a clean 503 instead of headers followed by a broken body.
    let first = chunks.rx.recv().await;
    if let Some(Err(e)) = &first {
        return Err(if e.kind() == std::io::ErrorKind::InvalidData {
            withheld(&model, &path)
        } else {
            Error::unavailable(
                "storage_unavailable",
                "The file could not be read from storage just now; try again shortly.",
            )
        });
    }
    let delivery = Delivery {
        state: state.clone(),
        jti: principal.jti.clone(),
        sha256: blob.sha256.clone(),
        path: file.path.clone(),
        size,
        start,
    };
    let mut body = AuditedBody::new(
        util::random_hex(12),
        delivery,
        first.and_then(Result::ok),
        chunks,
        log.clone(),
        started,
        state.audit.clone(),
    );
    if !body.settle().await {
        // Answered here rather than as an error, which would log the request a second time.
        drop(body);
        return Ok(HttpResponse::from_error(audit_unavailable()));
    }
    Ok(resp.no_chunking(len).streaming(body))
}

/// The blob's piece CVs, from the cache or (once) from the database; empty when the blob has
/// none or they cannot be read now (its blocks are then verified whole). A file of at most
/// one piece is one block that is checked whole anyway (a block's CVs are used only when it
/// has two or more), so it is not looked up at all.
async fn piece_cvs(state: &web::Data<State>, blob: &Blob) -> Bytes {
    use crate::storage::manifest::{PIECE_SIZE, pieces_apply};
    let block_size = blob.block_size as u64;
    if !pieces_apply(block_size) || blob.size as u64 <= PIECE_SIZE {
        return Bytes::new();
    }
    if let Some(cvs) = state.pieces.get(&blob.sha256, block_size) {
        return cvs;
    }
    let sha = blob.sha256.clone();
    match state.db.read(move |c| catalog::blob_pieces(c, &sha)).await {
        Ok(cvs) => {
            let cvs = Bytes::from(cvs);
            state.pieces.put(&blob.sha256, block_size, cvs.clone());
            cvs
        }
        Err(e) => {
            tracing::warn!(error = %e, sha256 = %blob.sha256, "piece hashes not loaded; verifying whole blocks");
            Bytes::new()
        }
    }
}

/// What a `(model, revision, path)` resolved to, with the response headers that depend on
/// nothing else (built once per cache entry rather than per request).
pub struct Resolved {
    commit: String,
    modified: i64,
    found: Option<(FileRow, Blob)>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Resolutions kept while the catalog epoch stands still (see `db::epoch`): steady-state
/// downloads do no catalog query, and a quarantine or re-import is seen at once.
pub type ResolveCache =
    crate::db::epoch::EpochCache<(String, String, String), std::sync::Arc<Resolved>>;

async fn resolve_path(
    state: &web::Data<State>,
    model: &str,
    revision: &str,
    path: &str,
) -> Result<std::sync::Arc<Resolved>> {
    let key = (model.to_string(), revision.to_string(), path.to_string());
    let stamp = state.db.epoch.current();
    if let Some(hit) = state.resolved.get(&key, stamp) {
        return Ok(hit);
    }
    let (m, rev, p) = key.clone();
    let (commit, modified, found) = state
        .db
        .read(move |c| {
            catalog::require_model(c, &m)?;
            let commit = catalog::resolve_revision(c, &m, &rev)?;
            let modified = catalog::revision_created_at(c, &m, &commit)?;
            let found = catalog::find_file(c, &m, &commit, &p)?;
            Ok((commit, modified, found))
        })
        .await?;
    let headers = match &found {
        Some((file, blob)) => file_headers(file, blob, &commit, modified),
        None => Vec::new(),
    };
    let resolved = std::sync::Arc::new(Resolved {
        commit,
        modified,
        found,
        headers,
    });
    state.resolved.put(key, stamp, resolved.clone());
    Ok(resolved)
}

/// Each revision's checksum list, generated (never stored): works with `sha256sum -c`.
const SUMS_FILE: &str = "SHA256SUMS";

async fn sha256sums(
    state: &web::Data<State>,
    model: &str,
    commit: &str,
    modified: i64,
) -> Result<HttpResponse> {
    let (m, c) = (model.to_string(), commit.to_string());
    let files = state
        .db
        .read(move |conn| catalog::list_files(conn, &m, &c))
        .await?;
    let body: String = files
        .iter()
        .map(|f| format!("{}  {}\n", f.sha256, f.path))
        .collect();
    let etag = format!("\"{}\"", util::sha256_hex(&body));
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .insert_header(("X-Repo-Commit", commit.to_string()))
        .insert_header((header::ETAG, etag))
        .insert_header((header::LAST_MODIFIED, http_date(modified)))
        .body(body))
}

fn withheld(model: &str, path: &str) -> Error {
    Error::unavailable(
        "quarantined",
        format!(
            "File {path} of model {model} failed an integrity check and is withheld until an administrator restores it. Try again later."
        ),
    )
}

/// `If-None-Match` against the strong ETag (weak comparison, as RFC 9110 asks for GET/HEAD).
fn etag_matches(req: &HttpRequest, sha256: &str) -> bool {
    let Some(v) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    v.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").trim_matches('"') == sha256)
}

fn http_date(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .unwrap_or_default()
}

fn repo_not_found(model: &str) -> Error {
    Error::not_found(
        "repo_not_found",
        format!("Model {model} does not exist on this server."),
    )
    .hub(HubCode::RepoNotFound)
}

/// The headers that say which file this is, the same for every request for it: its SHA-256
/// (ETag, X-Linked-Etag, Repr-Digest), its size and commit (as the Hugging Face client and
/// RFC 9530 expect), its name and when its revision was made. A value that cannot be a header
/// is left out (none of these inputs can produce one).
fn file_headers(
    file: &FileRow,
    blob: &Blob,
    commit: &str,
    modified: i64,
) -> Vec<(HeaderName, HeaderValue)> {
    let etag = format!("\"{}\"", blob.sha256);
    let digest = hex::decode(&blob.sha256).unwrap_or_default();
    let basename = file.path.rsplit('/').next().unwrap_or(&file.path);
    [
        (header::ETAG, etag.clone()),
        (HeaderName::from_static("x-linked-etag"), etag),
        (
            HeaderName::from_static("x-linked-size"),
            blob.size.to_string(),
        ),
        (HeaderName::from_static("x-repo-commit"), commit.to_string()),
        (
            HeaderName::from_static("repr-digest"),
            format!(
                "sha-256=:{}:",
                base64::engine::general_purpose::STANDARD.encode(digest)
            ),
        ),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CACHE_CONTROL, "private, no-transform".to_string()),
        (header::CONTENT_DISPOSITION, content_disposition(basename)),
        (header::LAST_MODIFIED, http_date(modified)),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name, HeaderValue::from_str(&value).ok()?)))
    .collect()
}

/// Warns a researcher whose access ends within a week (the Hub client prints `X-HF-Warning`).
fn expiry_warning(resp: &mut actix_web::HttpResponseBuilder, principal: &Principal, model: &str) {
    if let Some(exp) = principal.grant_expires_at {
        let left = exp - util::now();
        if left < 7 * 86400 {
            resp.insert_header(("X-HF-Warning", format!("weightgate-access-expiry; Your access to {model} expires on {}. Apply again or ask an administrator to extend it.", util::rfc3339(exp))));
        }
    }
}

/// `inline; filename="…"`, with an RFC 5987 `filename*` when the name is not plain ASCII.
fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if ascii == name {
        format!("inline; filename=\"{name}\"")
    } else {
        let enc = percent_encoding::utf8_percent_encode(name, paths::SEGMENT);
        format!("inline; filename=\"{ascii}\"; filename*=UTF-8''{enc}")
    }
}

/// Parses `Range` (one range: `N-`, `N-M`, `-K`) honouring `If-Range`; `None` means the
/// whole file. Anything else is a 416 that says which forms are accepted.
fn byte_range(req: &HttpRequest, blob: &Blob, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(value) = req.headers().get(header::RANGE) else {
        return Ok(None);
    };
    // A unit other than bytes is not understood, and RFC 9110 says to ignore it.
    if !value.as_bytes().trim_ascii_start().starts_with(b"bytes=") {
        return Ok(None);
    }
    if let Some(if_range) = req.headers().get(header::IF_RANGE) {
        let strong = format!("\"{}\"", blob.sha256);
        if if_range.to_str().ok().map(str::trim) != Some(strong.as_str()) {
            return Ok(None); // validator changed (or is a date): send the whole, current file
        }
    }
    let unsatisfiable = |why: &str| {
        Error::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", format!("{why} This server accepts bytes=N-, bytes=N-M or bytes=-K within 0..{size} (of several ranges, only the first is served)."))
            .with_header(header::CONTENT_RANGE, format!("bytes */{size}"))
    };
    let value = value
        .to_str()
        .map_err(|_| unsatisfiable("The Range header is not readable text."))?;
    parse_range(value, size).map_err(unsatisfiable).map(Some)
}

/// `[start, end)` of a single `bytes=` range.
pub fn parse_range(value: &str, size: u64) -> Result<(u64, u64), &'static str> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or("The Range unit must be bytes.")?;
    // Several ranges are reduced to the first one (answered as a single 206 whose
    // Content-Range says which bytes these are); multipart/byteranges is not produced.
    let first = spec.split(',').next().unwrap_or("");
    let (a, b) = first
        .trim()
        .split_once('-')
        .ok_or("The Range header is malformed.")?;
    let num = |s: &str| -> Result<u64, &'static str> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
            Err("The Range header is malformed.")
        } else {
            s.parse().map_err(|_| "The Range header is malformed.")
        }
    };
    let (start, end) = if a.is_empty() {
        let k = num(b)?;
        if k == 0 {
            return Err("A suffix range of zero bytes is empty.");
        }
        (size.saturating_sub(k), size)
    } else {
        let start = num(a)?;
        let end = if b.is_empty() {
            size
        } else {
            num(b)?.saturating_add(1).min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err("The range starts at or past the end of the file.");
    }
    Ok((start, end))
}

/// Turns a verification failure into a quarantine, an `integrity_failure` event and mail to
/// the admins, once per blob.
fn quarantine_on_failure(
    state: web::Data<State>,
    model: String,
    path: String,
    sha256: String,
) -> impl FnOnce(Failure) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static {
    move |failure: Failure| {
        tracing::error!(%model, %path, problem = %failure.describe(), "verification failed; response stopped");
        if !failure.is_corruption() {
            return Box::pin(std::future::ready(()));
        }
        // Committed before the client sees its transfer fail: the next request is refused.
        Box::pin(async move {
            let admins = state.ctx.admin_emails.clone();
            let problem = failure.describe();
            let result = state
                .db
                .write(move |c| {
                    crate::integrity::quarantine_in(c, &admins, &model, &path, &sha256, &problem)
                })
                .await;
            match result {
                Ok(_) => state.mail_queued(),
                Err(e) => tracing::error!(error = %e, "could not record a quarantine"),
            }
        })
    }
}

/// Where a stream's delivered bytes are recorded, for quotas and per-token counts.
struct Delivery {
    state: web::Data<State>,
    jti: String,
    sha256: String,
    path: String,
    size: u64,
    start: u64,
}

/// The response body: verified chunks, counted. When the last chunk is ready, the final
/// event is committed *before* that chunk is released, so a client never sees a complete
/// download the log does not hold (with `audit.acknowledge = "queue"`, the chunk waits only
/// until the event is queued). A download longer than one chunk also queues a `started`
/// event (which opens it in `open_downloads`, so a crash leaves it recorded as aborted) as
/// its first chunk leaves; a one-chunk download needs none, since none of its bytes leave
/// before its final event is committed (or queued). A body dropped early records
/// `aborted_by_client` or `integrity_failure`.
struct AuditedBody {
    id: String,
    delivery: Delivery,
    /// The first chunk, read before the headers were sent.
    first: Option<Bytes>,
    chunks: Chunks,
    sent: u64,
    log: FetchLog,
    started: Instant,
    sink: AuditSink,
    failed: bool,
    /// Whether the failure proved the bytes wrong (rather than unreadable).
    corrupt: bool,
    /// The last chunk, held until its final event is committed or queued (the wait is gone
    /// once it has ended).
    held: Option<(Bytes, Option<Ack>)>,
    finished: bool,
    /// Whether the `started` event was queued.
    opened: bool,
    /// How long the last chunk may wait for its event (`audit.ack_timeout_secs`).
    ack_timeout: Option<std::time::Duration>,
    /// Armed once the last chunk of a multi-chunk download waits.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last chunk's wait ran out: the download failed for want of its audit record.
    timed_out: bool,
}

/// The reason recorded for a download whose event the log could not take in time.
const AUDIT_LATE: &str = "audit_unavailable";

/// The answer to a download whose final event the log could not take in time (nothing sent).
fn audit_unavailable() -> Error {
    Error::unavailable(
        AUDIT_LATE,
        "The download could not be recorded in the audit log just now; try again shortly.",
    )
}

impl AuditedBody {
    fn new(
        id: String,
        delivery: Delivery,
        first: Option<Bytes>,
        chunks: Chunks,
        log: FetchLog,
        started: Instant,
        sink: AuditSink,
    ) -> AuditedBody {
        let secs = delivery.state.settings.audit.ack_timeout_secs;
        AuditedBody {
            id,
            delivery,
            first,
            chunks,
            sent: 0,
            log,
            started,
            sink,
            failed: false,
            corrupt: false,
            held: None,
            finished: false,
            opened: false,
            ack_timeout: (secs > 0).then(|| std::time::Duration::from_secs(secs)),
            deadline: None,
            timed_out: false,
        }
    }

    /// Queues the `started` event, before the first byte of a multi-chunk download leaves.
    fn open(&mut self) {
        if self.opened {
            return;
        }
        self.opened = true;
        let stream = StreamDetail {
            download: Some(&self.id),
            blocks: None,
        };
        let e = self
            .log
            .stream_event("started", 0, self.started, None, stream)
            .track(Track::Start(
                self.id.clone(),
                self.delivery.state.instance.clone(),
            ));
        self.sink.record(e);
    }

    /// The bytes this stream handed on, for the token's quota (none when a failure cut it).
    fn delivered(&self, sent: u64) -> Option<Delivered> {
        let d = &self.delivery;
        (sent > 0 && !self.failed).then(|| Delivered {
            jti: d.jti.clone(),
            sha256: d.sha256.clone(),
            path: d.path.clone(),
            size: d.size,
            range: d.start..d.start + sent,
        })
    }

    fn final_event(&self, outcome: &'static str, reason: Option<&str>) -> Event {
        let blocks_verified = self
            .chunks
            .blocks_verified
            .load(std::sync::atomic::Ordering::Relaxed);
        let stream = StreamDetail {
            download: Some(&self.id),
            blocks: Some((self.chunks.first_block, blocks_verified)),
        };
        let mut e = self
            .log
            .stream_event(outcome, self.sent, self.started, reason, stream);
        if self.opened {
            e = e.track(Track::End(self.id.clone()));
        }
        e
    }

    fn is_last(&self, b: &Bytes) -> bool {
        self.sent + b.len() as u64 >= self.log.expected && !self.finished
    }

    /// Holds the last chunk and hands on the final event, which counts it as sent.
    fn hold_last(&mut self, b: Bytes) {
        self.finished = true;
        let outcome = if self.log.status == 206 {
            "partial"
        } else {
            "complete"
        };
        self.sent += b.len() as u64;
        let mut e = self.final_event(outcome, None);
        e.delivered = self.delivered(self.sent);
        let ack = self.sink.finish(e);
        self.sent -= b.len() as u64;
        self.held = Some((b, Some(ack)));
    }

    /// A download whose first chunk is its last waits for its final event here, before the
    /// headers go out, so headers and body leave in one write. False: the wait ran out (the
    /// download is to be answered 503; dropping the body records why).
    async fn settle(&mut self) -> bool {
        let last = match self.first.take() {
            Some(b) if self.is_last(&b) => b,
            // An empty file: actix sends no body for `Content-Length: 0` and never polls this
            // one, so its final event is committed here or not at all.
            None if self.log.expected == 0 && !self.finished => Bytes::new(),
            other => {
                self.first = other;
                return true;
            }
        };
        let empty = last.is_empty();
        self.hold_last(last);
        // Awaited in place: a body dropped meanwhile still knows what it waited for.
        if !std::future::poll_fn(|cx| self.poll_ack(cx)).await {
            self.log.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
            return false;
        }
        if empty {
            // Nothing is left to send (and nothing would take it).
            self.held = None;
        }
        true
    }

    /// Counts a chunk; when it is the last one, holds it until the final event is committed
    /// (or queued).
    fn pass(&mut self, b: Bytes, cx: &mut TaskContext<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        if self.is_last(&b) {
            self.hold_last(b);
            return self.release(cx);
        }
        self.open();
        self.sent += b.len() as u64;
        Poll::Ready(Some(Ok(b)))
    }

    /// Waits for the held last chunk's final event (its commit, or room in the queue): true
    /// once the chunk may leave, false once `audit.ack_timeout_secs` ran out first. The chunk
    /// and a wait that ran out stay held, so that dropping the body records the failure.
    fn poll_ack(&mut self, cx: &mut TaskContext<'_>) -> Poll<bool> {
        if self.timed_out {
            return Poll::Ready(false);
        }
        let Some((_, ack)) = self.held.as_mut() else {
            return Poll::Ready(true);
        };
        if let Some(wait) = ack.as_mut() {
            if Pin::new(wait).poll(cx).is_pending() {
                let Some(limit) = self.ack_timeout else {
                    return Poll::Pending;
                };
                let deadline = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.timed_out = true;
                return Poll::Ready(false);
            }
            *ack = None;
        }
        Poll::Ready(true)
    }

    fn release(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        match self.poll_ack(cx) {
            Poll::Pending => Poll::Pending,
            // The held chunk never leaves.
            Poll::Ready(false) => Poll::Ready(Some(Err(std::io::Error::other(
                "the audit log could not take the download's final event in time",
            )))),
            Poll::Ready(true) => {
                let held = self.held.take().map(|(b, _)| b);
                self.sent += held.as_ref().map_or(0, |b| b.len() as u64);
                Poll::Ready(held.map(Ok))
            }
        }
    }
}

impl Stream for AuditedBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.held.is_some() {
            return self.release(cx);
        }
        if let Some(b) = self.first.take() {
            return self.pass(b, cx);
        }
        match self.chunks.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => self.pass(b, cx),
            Poll::Ready(Some(Err(e))) => {
                self.failed = true;
                self.corrupt = e.kind() == std::io::ErrorKind::InvalidData;
                Poll::Ready(Some(Err(e)))
            }
            // An empty body (an empty file) ends here; it still commits its final event.
            Poll::Ready(None)
                if !self.finished && !self.failed && self.sent >= self.log.expected =>
            {
                self.pass(Bytes::new(), cx)
            }
            other => other,
        }
    }
}

/// The reason logged for a client that left while the last chunk waited for the log.
const CLOSED_BEFORE_LAST: &str = "closed before the last chunk was delivered";

impl Drop for AuditedBody {
    fn drop(&mut self) {
        let m = &self.delivery.state.metrics;
        crate::metrics::Metrics::add(&m.bytes_served, self.sent);
        crate::metrics::Metrics::add(
            &m.blocks_verified,
            self.chunks
                .blocks_verified
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        if self.corrupt {
            crate::metrics::Metrics::add(&m.integrity_failures, 1);
        }
        // A final event still waiting for room in the queue was never queued.
        let unqueued = matches!(&self.held, Some((_, Some(Ack::Room(_)))));
        // A wait that ran out is the log's failure, not the client's.
        let (left, why) = match self.timed_out {
            true => ("error", AUDIT_LATE),
            false => ("aborted_by_client", CLOSED_BEFORE_LAST),
        };
        if !self.finished || unqueued {
            let outcome = match (self.failed, self.corrupt) {
                (true, true) => "integrity_failure",
                (true, false) => "storage_error",
                _ => left,
            };
            let reason = unqueued.then_some(why);
            let mut e = self.final_event(outcome, reason);
            e.delivered = self.delivered(self.sent);
            self.sink.record(e);
        } else if self.held.is_some() {
            // The last chunk never left (its client left, or the log was too late): correct
            // the record.
            let mut e = self.final_event(left, Some(why));
            e.track = None;
            self.sink.record(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FetchLog, StreamDetail, parse_range};
    use serde_json::json;

    /// The typed detail gives the very text a `json!` map of the same fields gives.
    #[test]
    fn fetch_details_read_as_the_sorted_map() {
        let log = FetchLog {
            method: "GET".into(),
            model: Some("org/m".into()),
            revision: Some("main".into()),
            commit: Some("c0ffee".into()),
            path: Some("dir/w \"1\".bin".into()),
            user: Some("u1".into()),
            jti: Some("j1".into()),
            range: Some("bytes=0-9".into()),
            client: Some("127.0.0.1".into()),
            status: 206,
            expected: 10,
        };
        // The one field that depends on timing is taken from the text itself.
        let ms = |text: &str| {
            serde_json::from_str::<serde_json::Value>(text).unwrap()["duration_ms"].clone()
        };
        let started = std::time::Instant::now();
        let plain = log.event("denied", 0, started, Some("token_scope"));
        assert_eq!(
            plain.detail,
            json!({"revision": "main", "commit": "c0ffee", "path": "dir/w \"1\".bin",
                "user": "u1", "jti": "j1", "range": "bytes=0-9", "client": "127.0.0.1",
                "status": 206, "bytes_expected": 10, "bytes_sent": 0, "duration_ms": ms(&plain.detail),
                "reason": "token_scope"})
            .to_string()
        );
        assert_eq!((plain.kind, plain.outcome), ("file_download", "denied"));
        assert_eq!(plain.actor.as_deref(), Some("user:u1"));
        let stream = StreamDetail {
            download: Some("d1"),
            blocks: Some((3, 2)),
        };
        let last = FetchLog {
            method: "HEAD".into(),
            user: None,
            ..log
        }
        .stream_event("partial", 10, started, None, stream);
        assert_eq!(
            last.detail,
            json!({"revision": "main", "commit": "c0ffee", "path": "dir/w \"1\".bin",
                "user": null, "jti": "j1", "range": "bytes=0-9", "client": "127.0.0.1",
                "status": 206, "bytes_expected": 10, "bytes_sent": 10, "duration_ms": ms(&last.detail),
                "reason": null, "download": "d1", "first_block": 3, "blocks_verified": 2})
            .to_string()
        );
        assert_eq!(last.kind, "file_head");
        assert_eq!(last.actor, None);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Ok((0, 10)));
        assert_eq!(parse_range("bytes=3-5", 10), Ok((3, 6)));
        assert_eq!(parse_range("bytes=3-500", 10), Ok((3, 10)));
        assert_eq!(parse_range("bytes=-4", 10), Ok((6, 10)));
        assert_eq!(parse_range("bytes=-40", 10), Ok((0, 10)));
        assert_eq!(parse_range("bytes=1-2, 5-6", 10), Ok((1, 3)));
        assert!(parse_range("bytes=1-2x,5-6", 10).is_err());
        for bad in [
            "bytes=10-",
            "bytes=5-3",
            "bytes=-0",
            "bytes=a-b",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
        ] {
            assert!(parse_range(bad, 10).is_err(), "{bad} accepted");
        }
    }
}
