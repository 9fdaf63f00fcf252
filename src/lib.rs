//! weightgate: a gated download proxy for model weights. Researchers apply, admins approve,
//! approved researchers get signed, scoped, expiring tokens, and every byte served is
//! verified against its manifest and written to a tamper-evident audit log.
//!
//! [`run`] starts the whole server; `main.rs` and the integration tests both call it.

pub mod alloc;
pub mod applications;
pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod countries;
pub mod db;
pub mod error;
pub mod integrity;
pub mod jobs;
pub mod mail;
pub mod metrics;
pub mod paths;
pub mod routes;
pub mod storage;
pub mod util;
pub mod webhooks;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use actix_web::http::Method;
use actix_web::{App, HttpResponse, HttpServer, web};

use crate::applications::Context;
use crate::audit::AuditSink;
use crate::auth::access::{Gate, TokenPolicy};
use crate::auth::keys::Keyring;
use crate::config::Settings;
use crate::db::Db;
use crate::mail::Mailer;
use crate::storage::Store;

/// Everything a request handler may need; shared by all workers.
pub struct State {
    pub settings: Settings,
    pub db: Db,
    pub store: Store,
    pub keys: Keyring,
    pub audit: AuditSink,
    pub metrics: Arc<metrics::Metrics>,
    /// Set when shutdown begins, so `/readyz` turns unready before the listener closes.
    pub shutting_down: std::sync::atomic::AtomicBool,
    pub mailer: Arc<Mailer>,
    pub webhooks: Arc<webhooks::Sender>,
    pub policy: TokenPolicy,
    pub ctx: Context,
    /// Token checks, their cache, signed links and quotas.
    pub gate: Gate,
    pub instance: String,
    /// Failed admin logins, per IP and per account.
    pub logins: auth::session::LoginLimiter,
    /// `(model, revision, path)` → what `/resolve` found, while the catalog is unchanged.
    pub resolved: routes::download::ResolveCache,
    /// Piece CVs of the files being streamed.
    pub pieces: storage::verify::PieceCache,
}

impl State {
    /// Wakes the mail and webhook workers after a transaction that queued messages committed.
    pub fn mail_queued(&self) {
        self.mailer.wake.notify_one();
        self.webhooks.wake.notify_one();
    }
}

/// The parts every command opens: database (migrated), storage and keys.
pub struct Core {
    /// This server's instance name, kept in the data dir, so a replica that restarts
    /// recognises the downloads it left open and no other replica's.
    pub instance: String,
    pub db: Db,
    pub store: Store,
    pub keys: Keyring,
}

impl Core {
    pub fn open(settings: &Settings) -> anyhow::Result<Core> {
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "data_dir: cannot create {}: {e}",
                settings.data_dir.display()
            )
        })?;
        Ok(Core {
            instance: instance_id(&settings.data_dir)?,
            db: Db::open(settings)?,
            store: Store::open(settings)?,
            keys: Keyring::open(&settings.data_dir)?,
        })
    }
}

/// Reads (or creates) `<data_dir>/instance-id`.
fn instance_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = util::random_hex(8);
            std::fs::write(&path, &id)?;
            Ok(id)
        }
    }
}

pub fn token_policy(settings: &Settings) -> TokenPolicy {
    TokenPolicy {
        issuer: settings.issuer(),
        audience: settings.tokens.audience.clone(),
        leeway: settings.tokens.leeway_secs,
        public_url: settings.public_url(),
        refresh: std::time::Duration::from_secs(settings.tokens.revocation_refresh_secs),
    }
}

pub fn context(settings: &Settings) -> Context {
    Context {
        public_url: settings.public_url(),
        admin_emails: settings.mail.admin_emails.clone(),
    }
}

/// Builds the actix server (kept out of `run` so that future stays `Send`).
fn http_server(
    state: web::Data<State>,
    listener: TcpListener,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    use actix_web::dev::Service;
    let grace = state.settings.server.shutdown_timeout_secs;
    let mut server = HttpServer::new(move || {
        let metrics = state.metrics.clone();
        App::new()
            .app_data(state.clone())
            .app_data(routes::json_config())
            .app_data(routes::query_config())
            .wrap_fn(move |req, srv| {
                // Every request gets an id (echoed as X-Request-Id and on its log lines) and is
                // counted by route pattern, method and status. The raw path and query string
                // (which may hold a token) are never logged.
                use tracing::Instrument;
                let download = routes::is_download_path(req.path());
                let route: std::borrow::Cow<'static, str> = if download {
                    routes::DOWNLOAD_ROUTE.into()
                } else {
                    req.match_pattern().unwrap_or_else(|| "unmatched".into()).into()
                };
                let method = req.method().clone();
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                    .map(str::to_string)
                    .unwrap_or_else(|| util::random_hex(8));
                let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
                let metrics = metrics.clone();
                let started = std::time::Instant::now();
                // Downloads (GET and HEAD) go straight to their handler, without the router's
                // regex match of the download pattern; other methods meet the router (405).
                let fut = if download && (method == Method::GET || method == Method::HEAD) {
                    let (http, _) = req.into_parts();
                    futures_util::future::Either::Left(async move {
                        let state = http.app_data::<web::Data<State>>().cloned().ok_or_else(|| {
                            actix_web::error::ErrorInternalServerError("no server state")
                        })?;
                        let res = match routes::download::resolve(http.clone(), state).await {
                            Ok(res) => res,
                            Err(e) => HttpResponse::from_error(e),
                        };
                        Ok(actix_web::dev::ServiceResponse::new(http, res))
                    })
                } else {
                    futures_util::future::Either::Right(srv.call(req))
                };
                async move {
                    let mut res = fut.await?;
                    let status = res.status().as_u16();
                    metrics.request(&route, method.as_str(), status);
                    tracing::debug!(status, ms = started.elapsed().as_millis() as u64, "answered");
                    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&id) {
                        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), v);
                    }
                    Ok(res)
                }
                .instrument(span)
            })
            .configure(routes::configure)
    })
    // No Nagle: a response whose last chunk waits for its audit commit goes out as a second
    // small write, which Nagle would hold until the client's delayed ACK (40 ms) came back.
    .on_connect(|conn, _| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>()
            && let Err(e) = tcp.set_nodelay(true)
        {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    })
    .listen(listener)?
    .disable_signals()
    .shutdown_timeout(grace);
    if workers > 0 {
        server = server.workers(workers);
    }
    Ok(server.run())
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight requests, the
/// audit queue and the mail worker before returning.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let core = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || Core::open(&s)).await??
    };
    let abandoned = audit::close_abandoned_downloads(&core.db, &core.instance).await?;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "recorded downloads cut off by the previous stop as aborted"
        );
    }
    if let Some(code) = auth::session::setup_code(&core.db).await? {
        // Shown once, to whoever started the server (like Jenkins' initial password); it stops
        // working as soon as the first administrator exists.
        eprintln!(
            "No administrator yet. Create the first one at:\n  {}/admin/setup?code={code}\n(or run `weightgate admin create --email you@example.org`)",
            settings.public_url()
        );
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let (audit, audit_task) = AuditSink::start(
        core.db.clone(),
        settings.audit.batch_max,
        settings.audit.queue_max,
        settings.audit.acknowledge,
        settings.audit.downloads,
        metrics.clone(),
    )?;
    let mailer = Arc::new(Mailer::new(&settings, core.db.clone())?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mail_task = tokio::spawn(mailer.clone().run(stop_rx));
    let hooks = Arc::new(webhooks::Sender::new(
        core.db.clone(),
        settings.mail.retry_base_secs as i64,
    )?);
    let hooks_task = tokio::spawn(hooks.clone().run(stop_tx.subscribe()));
    let notices_task = tokio::spawn(jobs::notices_loop(
        core.db.clone(),
        context(&settings),
        mailer.clone(),
        util::parse_duration(&settings.mail.notices_interval)
            .unwrap_or(std::time::Duration::from_secs(600)),
        stop_tx.subscribe(),
    ));
    let gate = Gate::new(
        core.db.clone(),
        core.keys.clone(),
        token_policy(&settings),
        metrics.clone(),
    );
    let checkpoint_every = (!settings.audit.checkpoint_file.is_empty()
        || !settings.audit.checkpoint_url.is_empty())
    .then(|| util::parse_duration(&settings.audit.checkpoint_interval).ok())
    .flatten();
    let checkpoint_task = checkpoint_every.map(|every| {
        tokio::spawn(jobs::checkpoint_loop(
            settings.clone(),
            core.db.clone(),
            every,
            stop_tx.subscribe(),
        ))
    });
    let keys_task = tokio::spawn(jobs::reload_keys(
        core.keys.clone(),
        gate.policy.refresh,
        stop_tx.subscribe(),
    ));
    let state = web::Data::new(State {
        metrics: metrics.clone(),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        instance: core.instance.clone(),
        logins: Default::default(),
        resolved: routes::download::ResolveCache::new(gate.policy.refresh, 100_000),
        pieces: Default::default(),
        gate,
        policy: token_policy(&settings),
        ctx: context(&settings),
        settings: settings.clone(),
        db: core.db,
        store: core.store,
        keys: core.keys,
        audit: audit.clone(),
        mailer,
        webhooks: hooks,
    });

    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = http_server(state.clone(), listener, settings.server.workers)?;
    let handle = server.handle();
    let scrub_task = settings
        .integrity
        .scrub_every()
        .map(|every| tokio::spawn(jobs::scrub_loop(state.clone(), every, stop_tx.subscribe())));
    tracing::info!(%addr, public_url = %settings.public_url(), "weightgate is serving");

    let server_task = tokio::spawn(server);
    shutdown.await;
    tracing::info!("shutting down: finishing requests, then flushing the audit log");
    state
        .shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if settings.server.drain_secs > 0 {
        tokio::time::sleep(std::time::Duration::from_secs(settings.server.drain_secs)).await;
    }
    handle.stop(true).await;
    let _ = server_task.await;
    let _ = stop_tx.send(true);
    let _ = mail_task.await;
    let _ = hooks_task.await;
    let _ = notices_task.await;
    let _ = keys_task.await;
    if let Some(t) = checkpoint_task {
        let _ = t.await;
    }
    if let Some(t) = scrub_task {
        let _ = t.await;
    }
    drop(state);
    // Everything queued before this point is committed when flush returns; the writer thread
    // itself ends once the last handle (held by dropped workers) is gone.
    audit.flush().await;
    drop(audit_task); // detached: it ends by itself once the last handle is gone
    Ok(())
}
