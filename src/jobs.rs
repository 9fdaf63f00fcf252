//! Background loops started by `serve`: the scheduled scrub.

use std::time::Duration;

use actix_web::web;
use tokio::sync::watch;

use crate::State;

/// Re-verifies every stored blob once per `interval`, until `stop` fires.
pub async fn scrub_loop(
    state: web::Data<State>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let admins = state.ctx.admin_emails.clone();
        let chunk = state.settings.storage.chunk_size;
        let run = crate::integrity::scrub(&state.db, &state.store, &admins, None, chunk);
        // Stopping mid-scrub is safe: each blob's verdict is committed on its own.
        let result = tokio::select! {
            r = run => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(r) => {
                tracing::info!(
                    checked = r.checked,
                    quarantined = r.quarantined.len(),
                    restored = r.restored.len(),
                    "scheduled scrub finished"
                );
                if !r.quarantined.is_empty() {
                    state.mail_queued();
                }
            }
            Err(e) => tracing::error!(error = %e, "scheduled scrub failed"),
        }
    }
}

/// Re-reads the signing keys every `every`, so a key retired by another process stops
/// verifying within that time.
pub async fn reload_keys(
    keys: crate::auth::keys::Keyring,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = every.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = tokio::task::spawn_blocking({
            let keys = keys.clone();
            move || keys.reload()
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
        {
            tracing::error!(error = %e, "could not reload signing keys");
        }
    }
}

/// Records the chain's head to the configured file and URL; returns it.
pub async fn write_checkpoint(
    settings: &crate::config::Settings,
    db: &crate::db::Db,
) -> anyhow::Result<crate::audit::Checkpoint> {
    let cp = db.read(crate::audit::checkpoint).await?;
    if !settings.audit.checkpoint_file.is_empty() {
        let path = std::path::PathBuf::from(&settings.audit.checkpoint_file);
        let line = cp.clone();
        tokio::task::spawn_blocking(move || crate::audit::append_checkpoint(&path, &line))
            .await??;
    }
    if !settings.audit.checkpoint_url.is_empty() {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        client
            .post(&settings.audit.checkpoint_url)
            .json(&cp)
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(cp)
}

/// Writes a checkpoint every `every` until `stop` fires.
pub async fn checkpoint_loop(
    settings: crate::config::Settings,
    db: crate::db::Db,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = write_checkpoint(&settings, &db).await {
            tracing::error!(error = %e, "could not write an audit checkpoint");
        }
    }
}

/// Expiry warnings and notices, and the administrators' daily digest: checked at start and
/// every `mail.notices_interval`.
pub async fn notices_loop(
    db: crate::db::Db,
    ctx: crate::applications::Context,
    mailer: std::sync::Arc<crate::mail::Mailer>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    const DIGEST_KEY: &str = "last_digest_at";
    loop {
        let c2 = ctx.clone();
        let result = db
            .write(move |c| {
                // One replica at a time: on PostgreSQL two replicas could otherwise both
                // read the same grants before either marks them, and warn twice.
                crate::db::models::audit::lock_chain(c)?;
                let now = crate::util::now();
                let mut n = crate::applications::expiry_notices(c, &c2, now)?;
                let last: i64 = crate::db::models::kv::get(c, DIGEST_KEY)?
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if now - last >= 86400 {
                    let listed = crate::applications::send_digest(c, &c2, now)?;
                    if listed > 0 {
                        crate::db::models::kv::set(c, DIGEST_KEY, &now.to_string())?;
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await;
        match result {
            Ok(n) if n > 0 => mailer.wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry notices or digest failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
