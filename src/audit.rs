//! The append-only audit log. Every row carries `prev_hash` and
//! `hash = SHA-256(prev_hash || canonical encoding of the row)`, so editing, deleting,
//! reordering or inserting a row breaks the chain that `audit verify` walks.
//!
//! Decisions and token changes append in the same transaction as the change itself.
//! Download events go through [`AuditSink`], a batching writer that commits many events
//! in one transaction off the request path.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::{Value, json};
use std::sync::mpsc;
use tokio::sync::{Semaphore, oneshot};

use crate::config::Acknowledge;
use crate::db::models::audit::{self as rows, AuditRow, NewRow};
use crate::db::models::tokens::{Completed, KnownCompleted};
use crate::db::{AnyConnection, Db};
use crate::error::Result;
use crate::util;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One thing that happened, before it is given its place in the chain.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub outcome: &'static str,
    pub actor: Option<String>,
    pub model_id: Option<String>,
    /// A JSON object, as the text stored in the row (keys in sorted order).
    pub detail: String,
    pub ts_ms: i64,
    /// For downloads: opens or closes an entry in `open_downloads`, in the same transaction.
    pub track: Option<Track>,
    /// For downloads: the bytes a token received, recorded for its quota in the same
    /// transaction (so a download costs no write of its own).
    pub delivered: Option<crate::db::models::tokens::Delivered>,
    /// Not written to the chain (download auditing turned off); only `delivered` is kept.
    pub unlogged: bool,
}

/// A download's life in the audit log: its `started` event opens it, its final event closes it.
#[derive(Debug, Clone)]
pub enum Track {
    /// The download's id and the server instance serving it.
    Start(String, String),
    End(String),
}

impl Event {
    pub fn new(kind: &'static str, outcome: &'static str) -> Event {
        Event {
            kind,
            outcome,
            actor: None,
            model_id: None,
            detail: "{}".to_string(),
            ts_ms: util::now_ms(),
            track: None,
            delivered: None,
            unlogged: false,
        }
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Event {
        self.actor = Some(actor.into());
        self
    }

    pub fn model(mut self, model: impl Into<String>) -> Event {
        self.model_id = Some(model.into());
        self
    }

    /// Sets the detail object. serde_json's default map is ordered by key, so this text is
    /// canonical.
    pub fn detail(mut self, detail: Value) -> Event {
        self.detail = detail.to_string();
        self
    }

    /// Sets the detail from a typed value that serialises to a JSON object; callers on hot
    /// paths use a struct with its fields in sorted order, which gives the same text as a map.
    pub fn detail_of(mut self, detail: &impl serde::Serialize) -> Event {
        self.detail = serde_json::to_string(detail).unwrap_or_else(|_| "{}".into());
        self
    }

    pub fn track(mut self, track: Track) -> Event {
        self.track = Some(track);
        self
    }
}

/// `SHA-256(prev_hash || canonical(row))`, where the canonical encoding is a JSON array of
/// every column but the two hashes, in a fixed order (`detail` exactly as stored). A JSON
/// array has one encoding for these values, whatever they contain.
pub fn row_hash(r: &AuditRow) -> String {
    chain_hash(&r.as_new())
}

/// [`row_hash`] of a row being written (its `hash` is not read). The array is serialised as
/// a tuple (the same bytes as a `json!` array of the values) into a buffer, then hashed in
/// one call: serde_json writes many small pieces, each of which would otherwise be a hasher
/// update of its own.
fn chain_hash(r: &NewRow<'_>) -> String {
    let canonical = (
        r.seq, r.ts_ms, r.kind, r.outcome, r.actor, r.model_id, r.detail,
    );
    let mut buf = Vec::with_capacity(r.prev_hash.len() + r.detail.len() + 160);
    buf.extend_from_slice(r.prev_hash.as_bytes());
    // Writing into a Vec cannot fail, and these values always serialise.
    let _ = serde_json::to_writer(&mut buf, &canonical);
    util::hex_lower(&util::sha256(&buf))
}

/// Appends events at the head of the chain, inside the caller's transaction (taking the
/// chain's lock first).
pub fn append(conn: &mut AnyConnection, events: &[Event]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    rows::lock_chain(conn)?;
    append_locked(conn, events)
}

/// [`append`] inside a transaction that already holds the chain's lock (one opened by
/// `Db::write_chain_blocking`).
pub fn append_locked(conn: &mut AnyConnection, events: &[Event]) -> Result<()> {
    append_events(conn, events, &KnownCompleted::default()).map(|_| ())
}

/// [`append_locked`], skipping the delivery records of files in `known`; returns the (jti,
/// sha256) pairs found or made complete, for the caller to add to `known` once this commits.
fn append_events(
    conn: &mut AnyConnection,
    events: &[Event],
    known: &KnownCompleted,
) -> Result<Completed> {
    use crate::db::models::tokens;
    if events.is_empty() {
        return Ok(Completed::default());
    }
    let pending = |d: &&tokens::Delivered| -> bool { !known.contains(&d.jti, &d.sha256) };
    // Files a token had completed before this batch need no delivery record (a later event
    // in the batch that completes a file is still checked by `record_delivery` itself).
    let mut done = tokens::completed_among(
        conn,
        events
            .iter()
            .filter_map(|e| e.delivered.as_ref())
            .filter(pending),
    )?;
    let mut made = Vec::new();
    let mut record = |conn: &mut AnyConnection, e: &Event| -> Result<()> {
        match &e.delivered {
            Some(d) if pending(&d) && !done.contains(&d.jti, &d.sha256) => {
                if tokens::record_delivery(conn, d, e.ts_ms / 1000)? {
                    made.push((d.jti.clone(), d.sha256.clone()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    };
    for e in events.iter().filter(|e| e.unlogged) {
        record(conn, e)?;
    }
    if !events.iter().all(|e| e.unlogged) {
        append_rows(conn, events, &mut record)?;
    }
    for (jti, sha256) in made {
        done.insert(jti, sha256);
    }
    Ok(done)
}

/// The chained rows of the logged events (and their delivery records, through `record`).
fn append_rows(
    conn: &mut AnyConnection,
    events: &[Event],
    record: &mut impl FnMut(&mut AnyConnection, &Event) -> Result<()>,
) -> Result<()> {
    let (head_seq, head) = rows::head(conn)?.unwrap_or((0, GENESIS.to_string()));
    let logged: Vec<&Event> = events.iter().filter(|e| !e.unlogged).collect();
    // Row i is number head_seq + 1 + i; its prev_hash is row i - 1's hash (or the head's).
    let seq_of = |i: usize| head_seq + 1 + i as i64;
    let mut hashes: Vec<String> = Vec::with_capacity(logged.len());
    for (i, e) in logged.iter().enumerate() {
        let prev = hashes.last().unwrap_or(&head);
        hashes.push(chain_hash(&new_row(e, seq_of(i), prev, "")));
    }
    let prevs = std::iter::once(&head).chain(&hashes);
    let mut out = Vec::with_capacity(logged.len());
    for (i, ((e, prev), hash)) in logged.iter().zip(prevs).zip(&hashes).enumerate() {
        let seq = seq_of(i);
        crate::webhooks::enqueue(conn, e, seq)?;
        record(conn, e)?;
        match &e.track {
            Some(Track::Start(id, instance)) => rows::open_download(
                conn,
                id,
                instance,
                e.ts_ms,
                e.model_id.as_deref(),
                &e.detail,
            )?,
            Some(Track::End(id)) => rows::close_download(conn, id)?,
            None => {}
        }
        out.push(new_row(e, seq, prev, hash));
    }
    rows::insert(conn, &out)
}

fn new_row<'a>(e: &'a Event, seq: i64, prev_hash: &'a str, hash: &'a str) -> NewRow<'a> {
    NewRow {
        seq,
        ts_ms: e.ts_ms,
        kind: e.kind,
        outcome: e.outcome,
        actor: e.actor.as_deref(),
        model_id: e.model_id.as_deref(),
        detail: &e.detail,
        prev_hash,
        hash,
    }
}

/// Where the chain first goes wrong, if it does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub rows: i64,
    /// Sequence number and hash of the last row that verified.
    pub head_seq: i64,
    pub head: String,
    pub broken_at: Option<i64>,
    pub problem: Option<String>,
    /// When older rows were archived and no archive was given: where this log takes over.
    pub starts_after: Option<(i64, String)>,
}

/// Checks rows one after another against the chain rules.
pub struct Walker {
    prev: String,
    next_seq: i64,
    rows: i64,
    broken: Option<(i64, String)>,
    starts_after: Option<(i64, String)>,
}

impl Walker {
    /// A chain that starts at the beginning.
    pub fn new() -> Walker {
        Walker::after(0, GENESIS.to_string())
    }

    /// A chain that continues after row `seq` whose hash is `hash` (e.g. after an archive).
    pub fn after(seq: i64, hash: String) -> Walker {
        Walker {
            prev: hash,
            next_seq: seq + 1,
            rows: 0,
            broken: None,
            starts_after: None,
        }
    }

    /// Checks one row; false once the chain is broken.
    pub fn step(&mut self, r: &AuditRow) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let problem = if r.seq != self.next_seq {
            Some(format!(
                "expected row {}, found row {} (a row is missing or was inserted)",
                self.next_seq, r.seq
            ))
        } else if r.prev_hash != self.prev {
            Some("prev_hash does not match the previous row's hash (rows deleted, swapped or inserted)".to_string())
        } else if row_hash(r) != r.hash {
            Some("the row's content does not match its hash (the row was edited)".to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            self.broken = Some((r.seq, p));
            return false;
        }
        self.prev = r.hash.clone();
        self.next_seq += 1;
        self.rows += 1;
        true
    }

    pub fn head(&self) -> (i64, &str) {
        (self.next_seq - 1, &self.prev)
    }

    pub fn verdict(self) -> Verdict {
        let (broken_at, problem) = match self.broken {
            Some((seq, p)) => (Some(seq), Some(p)),
            None => (None, None),
        };
        Verdict {
            rows: self.rows,
            head_seq: self.next_seq - 1,
            head: self.prev,
            broken_at,
            problem,
            starts_after: self.starts_after,
        }
    }
}

impl Default for Walker {
    fn default() -> Self {
        Walker::new()
    }
}

/// Walks the whole chain in the database, in order, and reports the first broken link.
/// `from` is where an archive ended; without one, a log whose older rows were archived is
/// checked from its first row on and says so in `starts_after`.
pub fn verify(conn: &mut AnyConnection, from: Option<(i64, String)>) -> Result<Verdict> {
    let mut walker = match from {
        Some((seq, hash)) => Walker::after(seq, hash),
        None => match rows::page(conn, 0, 1)?.first() {
            Some(first) if first.seq > 1 => {
                let mut w = Walker::after(first.seq - 1, first.prev_hash.clone());
                w.starts_after = Some((first.seq - 1, first.prev_hash.clone()));
                w
            }
            _ => Walker::new(),
        },
    };
    let mut after = 0;
    loop {
        let page = rows::page(conn, after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            if !walker.step(r) {
                return Ok(walker.verdict());
            }
        }
    }
    Ok(walker.verdict())
}

/// Walks an archive file written by [`archive`]; returns its verdict.
pub fn verify_archive(path: &std::path::Path) -> std::io::Result<Verdict> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)?;
    let mut walker = Walker::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: AuditRow = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        if !walker.step(&row) {
            break;
        }
    }
    Ok(walker.verdict())
}

/// The head of the chain, as written to checkpoint files and webhooks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub ts: String,
}

pub fn checkpoint(conn: &mut AnyConnection) -> Result<Checkpoint> {
    let (seq, hash) = rows::head(conn)?.unwrap_or((0, GENESIS.to_string()));
    Ok(Checkpoint {
        seq,
        hash,
        ts: util::rfc3339(util::now()),
    })
}

/// Checks recorded checkpoints against the log: each must still be there, unchanged; one
/// beyond the head means the tail was cut off. Returns the problems found.
pub fn check_checkpoints(
    conn: &mut AnyConnection,
    checkpoints: &[Checkpoint],
) -> Result<Vec<String>> {
    let head = rows::head(conn)?.map(|(s, _)| s).unwrap_or(0);
    let first = rows::page(conn, 0, 1)?.first().map(|r| r.seq).unwrap_or(1);
    let mut problems = Vec::new();
    for cp in checkpoints {
        if cp.seq == 0 || cp.seq < first {
            continue; // before the log's start (archived), checked with the archive
        }
        if cp.seq > head {
            problems.push(format!("checkpoint of {} names row {}, but the log ends at row {head}: its tail was removed", cp.ts, cp.seq));
            continue;
        }
        match rows::by_seq(conn, cp.seq)? {
            Some(r) if r.hash == cp.hash => {}
            Some(_) => problems.push(format!(
                "row {} no longer has the hash checkpointed at {}",
                cp.seq, cp.ts
            )),
            None => problems.push(format!(
                "row {} checkpointed at {} is missing",
                cp.seq, cp.ts
            )),
        }
    }
    Ok(problems)
}

/// Reads a checkpoint file (one JSON object a line).
pub fn read_checkpoints(path: &std::path::Path) -> std::io::Result<Vec<Checkpoint>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// Appends a checkpoint line to `path` and syncs it.
pub fn append_checkpoint(path: &std::path::Path, cp: &Checkpoint) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(
        f,
        "{}",
        serde_json::to_string(cp).map_err(std::io::Error::other)?
    )?;
    f.sync_all()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchiveReport {
    pub rows: i64,
    pub through_seq: i64,
    pub last_hash: String,
}

/// Moves the rows up to and including `through_seq` into a JSONL file (written, synced and
/// verified first), then deletes them from the database and records the archive in the log.
/// The remaining log's first row points at the archive's last hash, so both stay verifiable.
pub async fn archive(db: &Db, through_seq: i64, out: &std::path::Path) -> Result<ArchiveReport> {
    use std::io::Write;
    if out.exists() {
        return Err(crate::error::Error::conflict(
            "archive_exists",
            format!(
                "{} already exists; archives are never overwritten",
                out.display()
            ),
        ));
    }
    let first = db
        .read(|c| Ok(rows::page(c, 0, 1)?.first().map(|r| r.seq)))
        .await?;
    if first != Some(1) {
        return Err(crate::error::Error::conflict(
            "already_archived",
            "older rows were archived before; archive the log in one file per step from its first row (archive again from an unarchived copy)",
        ));
    }
    let tmp = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut after = 0;
    let mut walker = Walker::new();
    loop {
        let page = db.read(move |c| rows::page(c, after, 1000)).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page.iter().filter(|r| r.seq <= through_seq) {
            if !walker.step(r) {
                let v = walker.verdict();
                let _ = std::fs::remove_file(&tmp);
                return Err(crate::error::Error::conflict(
                    "chain_broken",
                    format!(
                        "the chain is broken at row {}: {}; fix that before archiving",
                        v.broken_at.unwrap_or(0),
                        v.problem.unwrap_or_default()
                    ),
                ));
            }
            writeln!(
                file,
                "{}",
                serde_json::to_string(r).map_err(std::io::Error::other)?
            )?;
        }
        if after >= through_seq {
            break;
        }
    }
    let file = file
        .into_inner()
        .map_err(|e| crate::error::Error::from(e.into_error()))?;
    file.sync_all()?;
    drop(file);
    let written = verify_archive(&tmp)?;
    let (last_seq, last_hash) = walker.head();
    let (last_seq, last_hash) = (last_seq, last_hash.to_string());
    if written.broken_at.is_some() || written.head != last_hash {
        let _ = std::fs::remove_file(&tmp);
        return Err(crate::error::Error::internal(
            "the archive did not read back as written",
        ));
    }
    std::fs::rename(&tmp, out)?;
    let name = out.display().to_string();
    let h = last_hash.clone();
    db.write(move |c| {
        rows::delete_through(c, last_seq)?;
        rows::set_archive_base(c, last_seq, &h)?;
        append(
            c,
            &[Event::new("audit_archived", "ok")
                .actor("cli")
                .detail(json!({"through_seq": last_seq, "last_hash": h, "file": name}))],
        )
    })
    .await?;
    Ok(ArchiveReport {
        rows: written.rows,
        through_seq: last_seq,
        last_hash,
    })
}

pub const CSV_HEADER: &str = "seq,ts,kind,outcome,actor,model,detail,prev_hash,hash";

/// One row as a CSV line (RFC 4180).
pub fn csv_line(r: &AuditRow) -> String {
    let cells = [
        r.seq.to_string(),
        util::rfc3339(r.ts_ms / 1000),
        r.kind.clone(),
        r.outcome.clone(),
        r.actor.clone().unwrap_or_default(),
        r.model_id.clone().unwrap_or_default(),
        r.detail.clone(),
        r.prev_hash.clone(),
        r.hash.clone(),
    ];
    cells
        .iter()
        .map(|c| csv_cell(c))
        .collect::<Vec<_>>()
        .join(",")
}

/// Quotes a cell when needed, and defuses cells a spreadsheet would run as a formula.
pub fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// One row as exported: `detail` as a JSON object rather than text.
pub fn export_value(r: &AuditRow) -> Value {
    json!({
        "seq": r.seq,
        "ts": util::rfc3339(r.ts_ms / 1000),
        "ts_ms": r.ts_ms,
        "kind": r.kind,
        "outcome": r.outcome,
        "actor": r.actor,
        "model": r.model_id,
        "detail": serde_json::from_str::<Value>(&r.detail).unwrap_or(Value::Null),
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

enum Msg {
    /// An event, and whether it holds a unit of the queue's room (events from
    /// [`AuditSink::log`]).
    Event(Box<Event>, bool),
    Flush(oneshot::Sender<()>),
    /// An event and its waiter in one message.
    Commit(Box<Event>, oneshot::Sender<()>),
}

/// What every sink handle and the writer share (one allocation, so a clone of the sink,
/// made for each download, touches one reference count besides the channel's).
struct Shared {
    /// Files tokens have completed, as committed by the writer.
    known: KnownCompleted,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Room in the queue for events from [`AuditSink::log`] (and, with `audit.acknowledge =
    /// "queue"`, downloads' final events): `audit.queue_max` permits. One is taken (and
    /// forgotten) before such an event is queued; the writer adds them back once a batch is
    /// committed, or `send` does when the event is not queued after all.
    room: Semaphore,
    queue_max: usize,
}

/// A handle to the batching writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Msg>,
    /// `audit.downloads`: whether download and HEAD events go into the chain.
    downloads: bool,
    /// `audit.acknowledge`: what a download's last chunk waits for.
    acknowledge: Acknowledge,
    shared: std::sync::Arc<Shared>,
}

/// What a download's last chunk waits for before it leaves (see [`AuditSink::finish`]).
pub enum Ack {
    /// The commit of the final event, queued already.
    Commit(oneshot::Receiver<()>),
    /// Nothing: the final event is queued.
    Queued,
    /// Room in the queue for the final event, which is queued once there is room; dropped
    /// before then, it has queued nothing.
    Room(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl Future for Ack {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            // A writer that is gone has logged why; the chunk is not held forever.
            Ack::Commit(rx) => Pin::new(rx).poll(cx).map(|_| ()),
            Ack::Queued => Poll::Ready(()),
            Ack::Room(queued) => queued.as_mut().poll(cx),
        }
    }
}

impl AuditSink {
    /// Starts the writer thread; it ends once every sink handle is dropped and the queue is
    /// empty.
    pub fn start(
        db: Db,
        batch_max: usize,
        queue_max: usize,
        acknowledge: Acknowledge,
        downloads: bool,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<(AuditSink, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let queue_max = queue_max.clamp(1, Semaphore::MAX_PERMITS);
        let shared = std::sync::Arc::new(Shared {
            known: KnownCompleted::default(),
            metrics,
            room: Semaphore::new(queue_max),
            queue_max,
        });
        let s = shared.clone();
        let task = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(db, rx, batch_max, s))?;
        Ok((
            AuditSink {
                tx,
                downloads,
                acknowledge,
                shared,
            },
            task,
        ))
    }

    /// Queues an event; it is committed with the next batch. Only for places that cannot
    /// wait (a stream's first chunk, a body being dropped), which add at most two events
    /// per download; request handlers use [`AuditSink::log`].
    pub fn record(&self, event: Event) {
        self.send(event, None, false);
    }

    /// Queues an event once there is room for it: at most `audit.queue_max` events from
    /// this method wait for the writer at a time. A flood of requests that are logged
    /// without holding their response (denied ones need no token) is slowed down to the
    /// writer's pace instead of growing the queue, and a request dropped while it waits
    /// for room (its client gone) queues nothing.
    pub async fn log(&self, event: Event) {
        let Some(event) = self.queue_if_room(event) else {
            return;
        };
        crate::metrics::Metrics::add(&self.shared.metrics.audit_queue_full, 1);
        // The semaphore is never closed, so the wait ends with room.
        if let Ok(permit) = self.shared.room.acquire().await {
            self.queue_in(permit, event);
        }
    }

    /// Queues an event as [`AuditSink::log`] does when there is room now; hands it back
    /// when there is none.
    fn queue_if_room(&self, event: Event) -> Option<Event> {
        match self.shared.room.try_acquire() {
            Ok(permit) => {
                self.queue_in(permit, event);
                None
            }
            Err(_) => Some(event),
        }
    }

    /// Queues an event in the room `permit` holds, which the writer gives back once the
    /// event is committed (`send` does, if it is not queued after all).
    fn queue_in(&self, permit: tokio::sync::SemaphorePermit<'_>, event: Event) {
        permit.forget();
        self.send(event, None, true);
    }

    /// Events from [`AuditSink::log`] waiting for the writer.
    pub fn queued(&self) -> usize {
        self.shared.queue_max - self.shared.room.available_permits()
    }

    /// Queues an event, with `waiter` to be answered once it commits (at once when the
    /// event has nothing to write; a writer that is gone is logged, and drops it). `room`:
    /// the event holds a unit of the queue's room, given back here if it is not queued.
    /// With `audit.downloads` off, a download event is kept only for its delivery record,
    /// and not even for that once the token has completed the file.
    fn send(&self, mut event: Event, waiter: Option<oneshot::Sender<()>>, room: bool) {
        let give_back = || {
            if room {
                self.shared.room.add_permits(1);
            }
        };
        if !self.downloads && matches!(event.kind, "file_download" | "file_head") {
            match &event.delivered {
                Some(d) if !self.shared.known.contains(&d.jti, &d.sha256) => {}
                _ => {
                    give_back();
                    if let Some(w) = waiter {
                        let _ = w.send(());
                    }
                    return;
                }
            }
            event.unlogged = true;
            event.track = None;
        }
        let event = Box::new(event);
        let msg = match waiter {
            Some(w) => Msg::Commit(event, w),
            None => Msg::Event(event, room),
        };
        if self.tx.send(msg).is_err() {
            give_back();
            tracing::error!("audit writer has stopped; an event could not be queued");
        }
    }

    /// Queues an event and returns a receiver that resolves once it is committed (at once
    /// when there was nothing to write).
    fn commit(&self, event: Event) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.send(event, Some(tx), false);
        rx
    }

    /// Hands on a download's final event; the returned [`Ack`] resolves when its last chunk
    /// may leave: once the event is committed (`audit.acknowledge = "commit"`), or once it
    /// is queued (`"queue"`; it then takes room like [`AuditSink::log`], so downloads too
    /// slow down to the writer's pace instead of growing the queue).
    pub fn finish(&self, event: Event) -> Ack {
        match self.acknowledge {
            Acknowledge::Commit => Ack::Commit(self.commit(event)),
            Acknowledge::Queue => match self.queue_if_room(event) {
                None => Ack::Queued,
                Some(event) => {
                    let sink = self.clone();
                    Ack::Room(Box::pin(async move { sink.log(event).await }))
                }
            },
        }
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The writer: one thread of its own, with the database work done in place (no hop to the
/// blocking pool and back for each batch). It takes whatever has queued up, up to
/// `batch_max` events, commits it as one transaction, then answers the waiters.
fn writer(db: Db, rx: mpsc::Receiver<Msg>, batch_max: usize, shared: std::sync::Arc<Shared>) {
    let (metrics, known) = (&shared.metrics, &shared.known);
    let mut batch: Vec<Event> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    // The units of the queue's room held by the batch's events, given back once committed.
    let mut room = 0;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e, holds_room) => {
                    batch.push(*e);
                    room += usize::from(holds_room);
                }
                Msg::Flush(w) => waiters.push(w),
                Msg::Commit(e, w) => {
                    batch.push(*e);
                    waiters.push(w);
                }
            }
            if batch.len() >= batch_max {
                break;
            }
            next = rx.try_recv().ok();
        }
        // Never drop events: a failed commit is retried with backoff until it succeeds.
        let mut delay = Duration::from_millis(50);
        while !batch.is_empty() {
            let started = std::time::Instant::now();
            // A panic inside the write (a bug, or one in a library) is retried like an error,
            // rather than ending the writer and with it every later event.
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                db.write_chain_blocking(|c| append_events(c, &batch, known))
            }))
            .unwrap_or_else(|_| Err(crate::error::Error::internal("the audit write panicked")));
            match attempt {
                Ok(done) => {
                    known.add(done.pairs());
                    metrics.audit_batches.fetch_add(1, Relaxed);
                    metrics.audit_events.fetch_add(batch.len() as u64, Relaxed);
                    metrics
                        .audit_write_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
                    batch.clear();
                    shared.room.add_permits(std::mem::take(&mut room));
                }
                Err(e) => {
                    tracing::error!(error = %e, pending = batch.len(), "audit batch not committed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// After a crash, downloads whose `started` event was committed but whose end never was are
/// recorded as aborted (called at start, before serving).
pub async fn close_abandoned_downloads(db: &Db, instance: &str) -> Result<usize> {
    let instance = instance.to_string();
    db.write(move |c| {
        let open = rows::open_downloads(c, &instance)?;
        let events: Vec<Event> = open
            .iter()
            .map(|(id, model, detail)| {
                let mut d: Value = serde_json::from_str(detail).unwrap_or_else(|_| json!({}));
                d["reason"] = json!("server_stopped");
                let mut e = Event::new("file_download", "aborted")
                    .detail(d)
                    .track(Track::End(id.clone()));
                e.model_id = model.clone();
                e
            })
            .collect();
        append(c, &events)?;
        Ok(events.len())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// The hash as first defined: SHA-256 of prev_hash, then a `json!` array of the columns.
    fn hash_as_defined(r: &AuditRow) -> String {
        let canonical = json!([
            r.seq, r.ts_ms, r.kind, r.outcome, r.actor, r.model_id, r.detail
        ]);
        let mut h = Sha256::new();
        h.update(r.prev_hash.as_bytes());
        h.update(serde_json::to_vec(&canonical).unwrap());
        hex::encode(h.finalize())
    }

    #[test]
    fn row_hashes_keep_their_definition() {
        let rows = [
            (1, None, None, "{}"),
            (
                42,
                Some("user:ä \"quoted\" \\ back\nslash"),
                Some("org/model"),
                r#"{"path":"a\"b","n":-1,"u":"\u0001é"}"#,
            ),
            (
                i64::MAX,
                Some(""),
                Some("x/y"),
                "{\"k\":[1,2,{\"z\":null}]}",
            ),
        ];
        for (seq, actor, model, detail) in rows {
            let r = AuditRow {
                seq,
                ts_ms: -5 + seq % 1000,
                kind: "file_download".into(),
                outcome: "complete\t<tab>".into(),
                actor: actor.map(str::to_string),
                model_id: model.map(str::to_string),
                detail: detail.into(),
                prev_hash: GENESIS.into(),
                hash: "ignored".into(),
            };
            assert_eq!(row_hash(&r), hash_as_defined(&r), "row {seq}");
        }
    }

    #[test]
    fn details_are_stored_as_sorted_json_text() {
        let e =
            Event::new("x", "ok").detail(json!({"b": 1, "a": [null, "é"], "c": {"z": 1, "y": 2}}));
        assert_eq!(e.detail, r#"{"a":[null,"é"],"b":1,"c":{"y":2,"z":1}}"#);
    }
}
