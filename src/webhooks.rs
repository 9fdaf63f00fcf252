//! Webhooks: lifecycle events posted to administrators' endpoints (Slack bridges, ticketing).
//! Deliveries are queued in the same transaction as the audit event that causes them, signed
//! with HMAC-SHA256 (`X-Weightgate-Signature: sha256=<hex>` over the body, which carries its
//! own timestamp, also sent as `X-Weightgate-Timestamp`), and retried with backoff, strictly in
//! order per endpoint.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::audit::Event;
use crate::db::models::webhooks::{self as rows, Delivery, Outcome, Webhook};
use crate::db::{AnyConnection, Db};
use crate::error::{Error, Result};
use crate::util;

/// The webhook event an audit event kind announces, if any.
pub fn event_name(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "application_submitted" => "application.submitted",
        "application_confirmed" => "application.confirmed",
        "application_approved" => "application.approved",
        "application_rejected" => "application.rejected",
        "grant_expiring" => "grant.expiring",
        "grant_expired" => "grant.expired",
        "grant_revoked" => "grant.revoked",
        "token_revoked" => "token.revoked",
        "integrity_failure" => "integrity.failure",
        _ => return None,
    })
}

pub const EVENTS: [&str; 9] = [
    "application.submitted",
    "application.confirmed",
    "application.approved",
    "application.rejected",
    "grant.expiring",
    "grant.expired",
    "grant.revoked",
    "token.revoked",
    "integrity.failure",
];

/// Queues deliveries for an audit event that has just been given `seq`, inside the caller's
/// transaction. Only the event's public facts go out: ids, model, reason; never a token.
pub fn enqueue(c: &mut AnyConnection, e: &Event, seq: i64) -> Result<()> {
    let Some(name) = event_name(e.kind) else {
        return Ok(());
    };
    let hooks = rows::active(c)?;
    let wanted: Vec<&Webhook> = hooks.iter().filter(|w| w.wants(name)).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let data = serde_json::from_str::<serde_json::Value>(&e.detail).unwrap_or_default();
    for w in wanted {
        let id = util::random_hex(12);
        let payload = json!({
            "id": id,
            "event": name,
            "timestamp": util::now(),
            "occurred_at": util::rfc3339(e.ts_ms / 1000),
            "model": e.model_id,
            "actor": e.actor,
            "data": data,
            "audit_seq": seq,
        });
        rows::enqueue(
            c,
            &Delivery {
                id,
                webhook_id: w.id.clone(),
                event: name.to_string(),
                payload: payload.to_string(),
                created_at: util::now(),
                attempts: 0,
                next_attempt_at: util::now(),
                sent_at: None,
                failed_at: None,
                last_error: None,
                seq,
                last_status: None,
            },
        )?;
    }
    Ok(())
}

/// `sha256=<hex HMAC-SHA256 of body with secret>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

/// Registers an endpoint; `events` empty means every event.
pub fn add(c: &mut AnyConnection, url: &str, secret: &str, events: &[String]) -> Result<Webhook> {
    let parsed = reqwest::Url::parse(url).map_err(|e| Error::invalid_field("url", e))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::invalid_field("url", "must be http(s)"));
    }
    if secret.len() < 16 {
        return Err(Error::invalid_field(
            "secret",
            "must have at least 16 characters",
        ));
    }
    if let Some(bad) = events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
        return Err(Error::invalid_field(
            "events",
            format!("{bad} is not one of {}", EVENTS.join(", ")),
        ));
    }
    let w = Webhook {
        id: util::random_hex(8),
        url: url.to_string(),
        secret: secret.to_string(),
        events: if events.is_empty() {
            "[\"*\"]".into()
        } else {
            serde_json::to_string(events).unwrap_or_default()
        },
        created_at: util::now(),
        disabled_at: None,
    };
    rows::insert(c, &w)?;
    Ok(w)
}

/// Delivers queued webhook calls.
pub struct Sender {
    db: Db,
    http: reqwest::Client,
    retry_base: i64,
    pub wake: Arc<Notify>,
}

const LEASE_SECS: i64 = 60;

impl Sender {
    pub fn new(db: Db, retry_base: i64) -> anyhow::Result<Sender> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Sender {
            db,
            http,
            retry_base,
            wake: Arc::new(Notify::new()),
        })
    }

    /// One pass: for every endpoint, its next due delivery (in order). Returns how many went out.
    pub async fn deliver_due(&self) -> Result<usize> {
        let hooks = self.db.read(rows::active).await?;
        let mut sent = 0;
        for w in hooks {
            loop {
                let (wid, now) = (w.id.clone(), util::now());
                let Some(d) = self
                    .db
                    .write(move |c| rows::claim_head(c, &wid, now, LEASE_SECS))
                    .await?
                else {
                    break;
                };
                let ok = self.attempt(&w, &d).await;
                let now = util::now();
                let attempts = d.attempts + 1;
                let outcome = match &ok {
                    Ok(status) => Outcome {
                        sent: true,
                        failed: false,
                        next_at: now,
                        status: Some(*status),
                        error: None,
                    },
                    Err((status, e)) if attempts >= crate::mail::MAX_ATTEMPTS => Outcome {
                        sent: false,
                        failed: true,
                        next_at: now,
                        status: *status,
                        error: Some(e),
                    },
                    Err((status, e)) => Outcome {
                        sent: false,
                        failed: false,
                        next_at: now + crate::mail::backoff_secs(self.retry_base, d.attempts),
                        status: *status,
                        error: Some(e),
                    },
                };
                let (id, sent_now, failed) = (d.id.clone(), outcome.sent, outcome.failed);
                let (status, error) = (outcome.status, outcome.error.map(str::to_string));
                let next_at = outcome.next_at;
                self.db
                    .write(move |c| {
                        rows::mark(
                            c,
                            &id,
                            &Outcome {
                                sent: sent_now,
                                failed,
                                next_at,
                                status,
                                error: error.as_deref(),
                            },
                            now,
                        )
                    })
                    .await?;
                if sent_now {
                    sent += 1;
                } else if !failed {
                    break; // the head waits for its retry; the rest wait behind it
                }
            }
        }
        Ok(sent)
    }

    async fn attempt(
        &self,
        w: &Webhook,
        d: &Delivery,
    ) -> std::result::Result<i32, (Option<i32>, String)> {
        let ts = serde_json::from_str::<Value>(&d.payload)
            .ok()
            .and_then(|v| v["timestamp"].as_i64())
            .unwrap_or_else(util::now);
        let sig = signature(&w.secret, d.payload.as_bytes());
        let r = self
            .http
            .post(&w.url)
            .header("Content-Type", "application/json")
            .header("User-Agent", "weightgate-webhooks")
            .header("X-Weightgate-Event", &d.event)
            .header("X-Weightgate-Delivery", &d.id)
            .header("X-Weightgate-Timestamp", ts.to_string())
            .header("X-Weightgate-Signature", sig)
            .body(d.payload.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => Ok(resp.status().as_u16() as i32),
            Ok(resp) => Err((
                Some(resp.status().as_u16() as i32),
                format!("HTTP {}", resp.status()),
            )),
            Err(e) => Err((None, e.to_string())),
        }
    }

    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::warn!(error = %e, "webhook pass failed");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
