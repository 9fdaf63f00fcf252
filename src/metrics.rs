//! Counters for `/metrics`, in the Prometheus text format. Plain atomics and one small map;
//! nothing on the request path takes more than a short lock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Method → status → count.
type ByMethod = BTreeMap<String, BTreeMap<u16, u64>>;

/// The value under `key`, added empty if missing (the key is copied only then); always
/// `Some`.
fn entry<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> Option<&'m mut V> {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key)
}

/// Figures kept elsewhere, read by the caller when `/metrics` is asked for.
pub struct Elsewhere {
    /// Emails in the outbox, not yet delivered.
    pub mail_backlog: i64,
    /// Webhook deliveries not yet made.
    pub webhook_backlog: i64,
    /// Events waiting for the audit writer that hold room in its queue.
    pub audit_queued: usize,
    /// Bytes streams read and verified themselves, and bytes they took from another stream's
    /// verified read (`storage::shared`).
    pub stream_bytes: (u64, u64),
}

#[derive(Default)]
pub struct Metrics {
    /// route pattern → method → status → count (nested so that counting a request that was
    /// seen before allocates nothing).
    requests: Mutex<BTreeMap<String, ByMethod>>,
    pub bytes_served: AtomicU64,
    pub blocks_verified: AtomicU64,
    pub integrity_failures: AtomicU64,
    pub token_cache_hits: AtomicU64,
    pub token_cache_misses: AtomicU64,
    pub audit_batches: AtomicU64,
    pub audit_events: AtomicU64,
    pub audit_write_micros: AtomicU64,
    /// Requests that found the audit queue full and waited for room.
    pub audit_queue_full: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &str, method: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(statuses) = entry(&mut m, route).and_then(|by| entry(by, method)) {
            *statuses.entry(status).or_default() += 1;
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The text exposition, with the figures kept elsewhere.
    pub fn render(&self, elsewhere: &Elsewhere) -> String {
        let Elsewhere {
            mail_backlog,
            webhook_backlog,
            audit_queued,
            stream_bytes: (read, shared),
        } = *elsewhere;
        let mut out = String::new();
        out.push_str("# HELP weightgate_http_requests_total HTTP requests by route pattern, method and status.\n# TYPE weightgate_http_requests_total counter\n");
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for (route, methods) in requests.iter() {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            for (method, statuses) in methods {
                for (status, n) in statuses {
                    out.push_str(&format!("weightgate_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}\n"));
                }
            }
        }
        drop(requests);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, kind, v) in [
            (
                "weightgate_bytes_served_total",
                "Verified weight bytes handed to clients.",
                "counter",
                g(&self.bytes_served),
            ),
            (
                "weightgate_blocks_verified_total",
                "Blocks whose BLAKE3 was checked before sending.",
                "counter",
                g(&self.blocks_verified),
            ),
            (
                "weightgate_integrity_failures_total",
                "Streams stopped by a failed verification.",
                "counter",
                g(&self.integrity_failures),
            ),
            (
                "weightgate_token_cache_hits_total",
                "Token checks answered from the verified-token cache.",
                "counter",
                g(&self.token_cache_hits),
            ),
            (
                "weightgate_token_cache_misses_total",
                "Token checks that verified the signature and read the database.",
                "counter",
                g(&self.token_cache_misses),
            ),
            (
                "weightgate_audit_queued",
                "Events waiting for the audit writer that hold room in its queue: those of requests logged without holding their response (HEADs, denials, 304s, reads), and downloads' final events with audit.acknowledge = queue.",
                "gauge",
                audit_queued as u64,
            ),
            (
                "weightgate_audit_queue_full_total",
                "Requests that found the audit queue full and waited for room in it.",
                "counter",
                g(&self.audit_queue_full),
            ),
            (
                "weightgate_audit_batches_total",
                "Audit batches committed by the download writer.",
                "counter",
                g(&self.audit_batches),
            ),
            (
                "weightgate_audit_events_total",
                "Audit events committed by the download writer.",
                "counter",
                g(&self.audit_events),
            ),
            (
                "weightgate_audit_write_seconds_total",
                "Time spent committing audit batches.",
                "counter",
                0,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            if name == "weightgate_audit_write_seconds_total" {
                out.push_str(&format!(
                    "{name} {:.6}\n",
                    g(&self.audit_write_micros) as f64 / 1e6
                ));
            } else {
                out.push_str(&format!("{name} {v}\n"));
            }
        }
        out.push_str(&format!("# HELP weightgate_stream_bytes_total Verified bytes streams read from storage themselves (source=read) or took from a concurrent stream of the same blob (source=shared).\n# TYPE weightgate_stream_bytes_total counter\nweightgate_stream_bytes_total{{source=\"read\"}} {read}\nweightgate_stream_bytes_total{{source=\"shared\"}} {shared}\n"));
        out.push_str(&format!("# HELP weightgate_outbox_backlog Messages waiting to be delivered.\n# TYPE weightgate_outbox_backlog gauge\nweightgate_outbox_backlog{{kind=\"mail\"}} {mail_backlog}\nweightgate_outbox_backlog{{kind=\"webhook\"}} {webhook_backlog}\n"));
        out
    }
}
