//! Mail: messages are written to the `mail_outbox` table in the same transaction as the
//! change that causes them, and a background worker delivers them (lettre's file transport
//! by default, SMTP when configured) with retries and exponential backoff.

pub mod templates;

use std::sync::Arc;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::Notify;

use crate::config::{MailSettings, MailTransport, Settings, SmtpTls};
use crate::db::models::outbox::{self, OutboxMail};
use crate::db::{AnyConnection, Db};
use crate::error::Result;
use crate::util;
use templates::Rendered;

/// Adds a message to the outbox inside the caller's transaction.
pub fn queue(c: &mut AnyConnection, to: &str, msg: &Rendered) -> Result<()> {
    let now = util::now();
    outbox::insert(
        c,
        &OutboxMail {
            id: util::random_hex(16),
            kind: msg.kind.to_string(),
            to_addr: to.to_string(),
            subject: msg.subject.clone(),
            body_text: msg.text.clone(),
            body_html: msg.html.clone(),
            created_at: now,
            attempts: 0,
            next_attempt_at: now,
            sent_at: None,
            failed_at: None,
            last_error: None,
        },
    )
}

enum Transport {
    File(AsyncFileTransport<Tokio1Executor>),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

/// Delivers outbox rows.
pub struct Mailer {
    db: Db,
    from: Mailbox,
    transport: Transport,
    retry_base: i64,
    pub wake: Arc<Notify>,
}

/// How a delivery attempt ended.
enum Attempt {
    Sent,
    Retry(String),
    Permanent(String),
}

impl Mailer {
    pub fn new(settings: &Settings, db: Db) -> anyhow::Result<Mailer> {
        let m: &MailSettings = &settings.mail;
        let from: Mailbox = m
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail.from: {e}"))?;
        let transport = match m.transport {
            MailTransport::File => {
                let dir = settings.data_dir.join("outbox");
                std::fs::create_dir_all(&dir)?;
                Transport::File(AsyncFileTransport::new(dir))
            }
            MailTransport::Smtp => {
                let builder = match m.smtp_tls {
                    SmtpTls::None => {
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&m.smtp_host)
                    }
                    SmtpTls::Starttls => {
                        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&m.smtp_host)
                            .map_err(|e| anyhow::anyhow!("mail.smtp_host: {e}"))?
                    }
                    SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&m.smtp_host)
                        .map_err(|e| anyhow::anyhow!("mail.smtp_host: {e}"))?,
                };
                let mut builder = builder
                    .port(m.smtp_port)
                    .timeout(Some(Duration::from_secs(30)));
                if !m.smtp_username.is_empty() {
                    builder = builder.credentials(Credentials::new(
                        m.smtp_username.clone(),
                        m.smtp_password.0.clone(),
                    ));
                }
                Transport::Smtp(builder.build())
            }
        };
        Ok(Mailer {
            db,
            from,
            transport,
            retry_base: m.retry_base_secs as i64,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Attempts every due message once; returns how many were sent.
    pub async fn deliver_due(&self) -> Result<usize> {
        // The claim is ours until the lease runs out; a message is only attempted while a
        // whole attempt still fits, so no other replica can claim it while it is being sent.
        let lease_ends = std::time::Instant::now() + Duration::from_secs(CLAIM_LEASE_SECS as u64);
        let now = util::now();
        let due = self
            .db
            .write(move |c| outbox::claim(c, now, 50, CLAIM_LEASE_SECS))
            .await?;
        let mut sent = 0;
        for mail in due {
            if std::time::Instant::now() + ATTEMPT_LIMIT >= lease_ends {
                break; // the rest are claimed again once their lease has run out
            }
            let id = mail.id.clone();
            let attempts = mail.attempts;
            let result = tokio::time::timeout(ATTEMPT_LIMIT, self.attempt(&mail))
                .await
                .unwrap_or_else(|_| Attempt::Retry("the SMTP server took too long".into()));
            let now = util::now();
            match result {
                Attempt::Sent => {
                    sent += 1;
                    self.db
                        .write(move |c| outbox::mark_sent(c, &id, now))
                        .await?;
                }
                Attempt::Retry(err) if attempts + 1 >= MAX_ATTEMPTS => {
                    tracing::error!(mail = %id, error = %err, "mail delivery failed too often; giving up");
                    let err = format!("gave up after {MAX_ATTEMPTS} attempts: {err}");
                    self.db
                        .write(move |c| outbox::mark_failed(c, &id, now, &err))
                        .await?;
                }
                Attempt::Retry(err) => {
                    tracing::warn!(mail = %id, attempts = attempts + 1, error = %err, "mail delivery failed; will retry");
                    let next = now + backoff_secs(self.retry_base, attempts);
                    self.db
                        .write(move |c| outbox::mark_retry(c, &id, next, &err))
                        .await?;
                }
                Attempt::Permanent(err) => {
                    tracing::error!(mail = %id, error = %err, "mail delivery failed permanently");
                    self.db
                        .write(move |c| outbox::mark_failed(c, &id, now, &err))
                        .await?;
                }
            }
        }
        Ok(sent)
    }

    async fn attempt(&self, mail: &OutboxMail) -> Attempt {
        let to: Mailbox = match mail.to_addr.parse() {
            Ok(to) => to,
            Err(e) => return Attempt::Permanent(format!("bad recipient address: {e}")),
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .message_id(Some(format!("<{}@weightgate>", mail.id)))
            .multipart(MultiPart::alternative_plain_html(
                mail.body_text.clone(),
                mail.body_html.clone(),
            ));
        let message = match message {
            Ok(m) => m,
            Err(e) => return Attempt::Permanent(format!("cannot build message: {e}")),
        };
        match &self.transport {
            Transport::File(t) => match t.send(message).await {
                Ok(_) => Attempt::Sent,
                Err(e) => Attempt::Retry(e.to_string()),
            },
            Transport::Smtp(t) => match t.send(message).await {
                Ok(_) => Attempt::Sent,
                Err(e) if e.is_permanent() => Attempt::Permanent(e.to_string()),
                Err(e) => Attempt::Retry(e.to_string()),
            },
        }
    }

    /// Runs until `stop` fires: delivers due mail when woken and at least every few seconds.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::warn!(error = %e, "mail outbox pass failed");
            }
            // Sleep until the next retry is due (at most 5 s), or until new mail is queued.
            let next = self.db.read(outbox::next_due).await.ok().flatten();
            let wait = next.map_or(5, |t| (t - util::now()).clamp(1, 5)) as u64;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// How long a worker holds a claimed message before another worker may try it.
const CLAIM_LEASE_SECS: i64 = 120;
/// The longest one delivery attempt may take (it is cut off then and retried later).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(45);
/// Attempts before a message that keeps failing is marked failed.
pub const MAX_ATTEMPTS: i32 = 10;

/// base, 2×base, 4×base, … capped at one hour.
pub fn backoff_secs(base: i64, attempts: i32) -> i64 {
    (base.max(1) << attempts.clamp(0, 10)).min(3600)
}
