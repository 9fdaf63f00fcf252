//! The append-only audit log. Every row carries `prev_hash` and
//! `hash = SHA-256(prev_hash || canonical encoding of the row)`, so editing, deleting,
//! reordering or inserting a row breaks the chain that `audit verify` walks.
//!
//! Decisions and token changes append in the same transaction as the change itself.
//! Download events go through [`AuditSink`], a batching writer that commits many events
//! in one transaction off the request path.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::db::models::audit::{self as rows, AuditRow};
use crate::db::{AnyConnection, Db};
use crate::error::Result;
use crate::util;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One thing that happened, before it is given its place in the chain.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub outcome: String,
    pub actor: Option<String>,
    pub model_id: Option<String>,
    pub detail: Value,
    pub ts_ms: i64,
}

impl Event {
    pub fn new(kind: &str, outcome: &str) -> Event {
        Event {
            kind: kind.to_string(),
            outcome: outcome.to_string(),
            actor: None,
            model_id: None,
            detail: json!({}),
            ts_ms: util::now_ms(),
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

    pub fn detail(mut self, detail: Value) -> Event {
        self.detail = detail;
        self
    }
}

/// `SHA-256(prev_hash || canonical(row))`, where the canonical encoding is a JSON array of
/// every column but the two hashes, in a fixed order (`detail` exactly as stored). A JSON
/// array has one encoding for these values, whatever they contain.
pub fn row_hash(r: &AuditRow) -> String {
    let canonical = json!([
        r.seq, r.ts_ms, r.kind, r.outcome, r.actor, r.model_id, r.detail
    ]);
    let mut h = Sha256::new();
    h.update(r.prev_hash.as_bytes());
    h.update(serde_json::to_vec(&canonical).unwrap_or_default());
    hex::encode(h.finalize())
}

/// Appends events at the head of the chain, inside the caller's transaction.
pub fn append(conn: &mut AnyConnection, events: &[Event]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    rows::lock_chain(conn)?;
    let (mut seq, mut prev) = rows::head(conn)?.unwrap_or((0, GENESIS.to_string()));
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        seq += 1;
        // serde_json's default map is ordered by key, so this text is canonical.
        let detail = serde_json::to_string(&e.detail).unwrap_or_else(|_| "{}".into());
        let mut row = AuditRow {
            seq,
            ts_ms: e.ts_ms,
            kind: e.kind.clone(),
            outcome: e.outcome.clone(),
            actor: e.actor.clone(),
            model_id: e.model_id.clone(),
            detail,
            prev_hash: prev,
            hash: String::new(),
        };
        row.hash = row_hash(&row);
        prev = row.hash.clone();
        out.push(row);
    }
    rows::insert(conn, &out)
}

/// Where the chain first goes wrong, if it does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub rows: i64,
    pub head: String,
    pub broken_at: Option<i64>,
    pub problem: Option<String>,
}

/// Walks the whole chain in order and reports the first broken link.
pub fn verify(conn: &mut AnyConnection) -> Result<Verdict> {
    let mut prev = GENESIS.to_string();
    let mut expect_seq = 1;
    let mut count = 0;
    let mut after = 0;
    loop {
        let page = rows::page(conn, after, 1000)?;
        if page.is_empty() {
            break;
        }
        for r in page {
            after = r.seq;
            let problem = if r.seq != expect_seq {
                Some(format!(
                    "expected row {expect_seq}, found row {} (a row is missing or was inserted)",
                    r.seq
                ))
            } else if r.prev_hash != prev {
                Some("prev_hash does not match the previous row's hash (rows deleted, swapped or inserted)".to_string())
            } else if row_hash(&r) != r.hash {
                Some("the row's content does not match its hash (the row was edited)".to_string())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Ok(Verdict {
                    rows: count,
                    head: prev,
                    broken_at: Some(r.seq),
                    problem: Some(problem),
                });
            }
            prev = r.hash;
            expect_seq += 1;
            count += 1;
        }
    }
    Ok(Verdict {
        rows: count,
        head: prev,
        broken_at: None,
        problem: None,
    })
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
    Event(Event),
    Flush(oneshot::Sender<()>),
}

/// A handle to the batching writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::UnboundedSender<Msg>,
}

impl AuditSink {
    /// Starts the writer task; it ends once every sink handle is dropped and the queue is empty.
    pub fn start(db: Db, batch_max: usize) -> (AuditSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(writer(db, rx, batch_max));
        (AuditSink { tx }, task)
    }

    /// Queues an event; it is committed with the next batch.
    pub fn record(&self, event: Event) {
        if self.tx.send(Msg::Event(event)).is_err() {
            tracing::error!("audit writer has stopped; an event could not be queued");
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

async fn writer(db: Db, mut rx: mpsc::UnboundedReceiver<Msg>, batch_max: usize) {
    let mut batch: Vec<Event> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(e),
                Msg::Flush(w) => waiters.push(w),
            }
            if batch.len() >= batch_max {
                break;
            }
            next = rx.try_recv().ok();
        }
        // Never drop events: a failed commit is retried with backoff until it succeeds.
        let mut delay = Duration::from_millis(50);
        while !batch.is_empty() {
            let events = batch.clone();
            match db.write(move |c| append(c, &events)).await {
                Ok(()) => batch.clear(),
                Err(e) => {
                    tracing::error!(error = %e, pending = batch.len(), "audit batch not committed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}
