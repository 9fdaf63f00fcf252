//! The `weightgate` command: each subcommand parses its flags and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use weightgate::audit;
use weightgate::auth::access::{self, IssueRequest};
use weightgate::config::Settings;
use weightgate::db::models::{access as people, audit as audit_rows, catalog};
use weightgate::mail::Mailer;
use weightgate::storage::import::{self, ImportRequest};
use weightgate::{Core, applications, util};

/// Small blocks from mimalloc, large ones from glibc (see `weightgate::alloc`).
#[global_allocator]
static ALLOC: weightgate::alloc::Hybrid = weightgate::alloc::Hybrid;

#[derive(Parser)]
#[command(
    name = "weightgate",
    version,
    about = "A gated download proxy for model weights"
)]
struct Cli {
    /// TOML configuration file (defaults, then this file, then WEIGHTGATE__SECTION__KEY variables)
    #[arg(long, global = true, env = "WEIGHTGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (migrates the database first)
    Serve,
    /// Run pending database migrations
    Migrate,
    /// Import and list models
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Review applications
    #[command(subcommand)]
    Applications(ApplicationsCmd),
    /// Issue and revoke download tokens
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Signing keys
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Administrators and their API tokens
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Researchers
    #[command(subcommand)]
    Users(UsersCmd),
    /// Webhook endpoints for lifecycle events
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
    /// The tamper-evident audit log
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Download a model revision, verifying every block and file (resumes where it stopped)
    #[command(after_help = weightgate::client::EXIT_CODES_HELP)]
    Download {
        repo: String,
        #[arg(long)]
        endpoint: String,
        /// Download token (else WEIGHTGATE_TOKEN, else HF_TOKEN)
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "main")]
        revision: String,
        /// Only files matching this glob (repeatable)
        #[arg(long)]
        include: Vec<String>,
        /// Skip files matching this glob (repeatable)
        #[arg(long)]
        exclude: Vec<String>,
        /// Target folder (default: the model's name)
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Blocks fetched at once
        #[arg(long, default_value_t = 6)]
        parallel: usize,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Apply for access to a model from the terminal
    Apply {
        repo: String,
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "")]
        affiliation: String,
        /// ISO 3166-1 alpha-2, e.g. FR
        #[arg(long, default_value = "")]
        country: String,
        #[arg(long, default_value = "")]
        intended_use: String,
        /// An answer to one of the model's questions (repeatable)
        #[arg(long = "answer", value_parser = parse_answer)]
        answers: Vec<(String, String)>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Show an application's status from its status link
    Status {
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        link: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Check a downloaded folder against the SHA256SUMS in it (exit 1 on any mismatch)
    Verify {
        dir: PathBuf,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON only
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Import a folder as a revision of ORG/NAME (a new revision only when content changed)
    Add {
        repo: String,
        /// A local folder to import (copied into storage)
        #[arg(long, required_unless_present_any = ["from_bucket", "from_upstream"], conflicts_with_all = ["from_bucket", "from_upstream"])]
        from: Option<PathBuf>,
        /// Record the upstream origin's revision (storage.backend = "upstream"); files are
        /// pulled through and verified on first download
        #[arg(long, conflicts_with = "from_bucket")]
        from_upstream: bool,
        /// A prefix in the configured bucket whose objects are registered where they are
        #[arg(long)]
        from_bucket: Option<String>,
        #[arg(long, value_parser = ["manual", "auto", "domain", "rules"])]
        gating: Option<String>,
        #[arg(long, default_value = "main")]
        revision: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        license: Option<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// List models with their main commit
    List {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Re-verify stored files (all, or one model's); quarantine what fails, release what
    /// verifies again. Exits 1 when anything failed.
    Scrub {
        repo: Option<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Subcommand)]
enum ApplicationsCmd {
    /// List applications, oldest first
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Approve a pending application (creates the grant)
    Approve {
        id: String,
        /// Grant lifetime, e.g. 30d; no expiry when absent
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Reject a pending application with a reason the researcher sees
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Issue a download token for a user's active grant; prints the token
    Issue {
        #[arg(long)]
        email: String,
        #[arg(long)]
        model: String,
        /// Lifetime, e.g. 7d (tokens.default_ttl when absent); never beyond the grant
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        max_downloads: Option<i64>,
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Revoke a token by its jti
    Revoke {
        jti: String,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Create an administrator; the password is read from standard input (one line)
    Create {
        #[arg(long)]
        email: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Administrator API tokens (wg_admin_…), for automation and HfApi
    #[command(subcommand)]
    Token(AdminTokenCmd),
}

#[derive(Subcommand)]
enum AdminTokenCmd {
    /// Issue an API token for an administrator; prints it once
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Revoke an API token by its id
    Revoke { id: String },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a new signing key; older keys keep verifying
    Rotate {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Stop a key verifying (tokens it signed stop working)
    Retire { kid: String },
    /// List keys
    List {
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Subcommand)]
enum WebhooksCmd {
    /// Register an endpoint; events default to all
    Add {
        url: String,
        /// Shared secret for the HMAC-SHA256 signature (at least 16 characters)
        #[arg(long, env = "WEIGHTGATE_WEBHOOK_SECRET")]
        secret: String,
        /// Comma-separated events, e.g. application.submitted,grant.revoked
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// List endpoints
    List {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// An endpoint's delivery log, newest first
    Deliveries {
        id: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Stop delivering to an endpoint
    Remove { id: String },
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Delete a researcher: grants and tokens stop working, personal data is removed
    Delete {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Walk the hash chain and report the first broken link (exit 1 if broken)
    Verify {
        /// The archive file that older rows were moved to (checked, and linked to the log)
        #[arg(long)]
        archive: Option<PathBuf>,
        /// A checkpoint file: every checkpoint in it must still be in the log, unchanged
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Print events in chain order
    Export {
        #[arg(long, value_parser = ["jsonl", "csv"], default_value = "jsonl")]
        format: String,
        /// Only events from this time on (RFC 3339 or YYYY-MM-DD)
        #[arg(long)]
        since: Option<String>,
        /// Only events about this model
        #[arg(long)]
        model: Option<String>,
    },
    /// Write the chain's head (row and hash) to the checkpoint file/URL now, and print it
    Checkpoint,
    /// Move older events into a JSONL file that stays verifiable with the rest of the log
    Archive {
        /// Archive events older than this time (RFC 3339 or YYYY-MM-DD)
        #[arg(long)]
        before: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_answer(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

/// The client commands talk to a server and need no local configuration or database.
fn client_command(command: &Command) -> Option<ExitCode> {
    use weightgate::client;
    let result = match command {
        Command::Download {
            repo,
            endpoint,
            token,
            revision,
            include,
            exclude,
            dir,
            parallel,
            out,
        } => {
            let token = token
                .clone()
                .or_else(|| std::env::var("WEIGHTGATE_TOKEN").ok())
                .or_else(|| std::env::var("HF_TOKEN").ok());
            let dir = dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(repo.rsplit('/').next().unwrap_or(repo)));
            let req = client::DownloadRequest {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                repo: repo.clone(),
                revision: revision.clone(),
                token,
                include: include.clone(),
                exclude: exclude.clone(),
                dir: dir.clone(),
                parallel: *parallel,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()) && !out.json,
            };
            client::download(&req).map(|r| {
                if out.json {
                    let _ = print_json(&r);
                } else {
                    println!(
                        "{} files verified in {} (revision {}); SHA256SUMS written",
                        r.files.len(),
                        dir.display(),
                        r.commit
                    );
                }
            })
        }
        Command::Apply {
            repo,
            endpoint,
            email,
            name,
            affiliation,
            country,
            intended_use,
            answers,
            out,
        } => {
            let req = client::ApplyRequest {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                repo: repo.clone(),
                name: name.clone(),
                email: email.clone(),
                affiliation: affiliation.clone(),
                country: country.clone(),
                intended_use: intended_use.clone(),
                answers: answers.clone(),
            };
            client::apply(&req).map(|v| {
                if out.json {
                    let _ = print_json(&v);
                } else {
                    println!("Application sent. Confirm it with the link emailed to {email}.");
                    println!(
                        "Status link (keep it): {}",
                        v["status_url"].as_str().unwrap_or("")
                    );
                }
            })
        }
        Command::Status { link, out, .. } => client::status(link).map(|v| {
            if out.json {
                let _ = print_json(&v);
            } else {
                println!(
                    "{}: {}",
                    v["model"].as_str().unwrap_or(""),
                    v["status"].as_str().unwrap_or("")
                );
                if let Some(r) = v["reason"].as_str() {
                    println!("reason: {r}");
                }
                if v["grant_active"] == true {
                    println!(
                        "access: granted{}",
                        v["grant_expires_at"]
                            .as_i64()
                            .map(|e| format!(" until {}", util::rfc3339(e)))
                            .unwrap_or_default()
                    );
                }
            }
        }),
        _ => return None,
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weightgate: {e}");
            ExitCode::from(e.code)
        }
    })
}

/// Tunes glibc's allocator for streaming, before any thread starts. glibc serves the blocks of
/// 64 KiB and more (`weightgate::alloc`), which are the stream buffers, and the C libraries
/// (SQLite, libpq):
/// - glibc gives every thread that allocates its own arena (up to eight per core), and a
///   stream buffer freed on a worker stays resident in the arena of the blocking thread that
///   read it; four arenas keep the blocking readers from multiplying resident memory (64
///   ranged streams, ad hoc: 55 MiB peak with glibc's 16, 49 with four; two save 7 MiB more
///   but cost 13 % of the tiny-request rate in arena lock waits);
/// - stream buffers and actix's write buffer (up to `storage.chunk_size`, 512 KiB) would
///   otherwise be fresh `mmap`s, so every read faulted in and zeroed new pages (10 % of a
///   stream's CPU in a profile); below a fixed 4 MiB threshold they are reused from the heap
///   (one stream: about 0.8 → 0.68 CPU-s/GB, eight: 0.62 → 0.43, ad hoc).
///
/// glibc's own settings (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`, or any `GLIBC_TUNABLES`) win over these when set.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (var, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 4),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 4 << 20),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 16 << 20),
    ] {
        if std::env::var_os("GLIBC_TUNABLES").is_none() && std::env::var_os(var).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

fn main() -> ExitCode {
    tune_malloc();
    weightgate::util::raise_open_files_limit();
    let cli = Cli::parse();
    if let Some(code) = client_command(&cli.command) {
        return code;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("weightgate: {e}");
            return ExitCode::from(2);
        }
    };
    let default_level = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    // Colours only for a terminal: a log file or collector gets plain text (and each span
    // of each request is formatted a little cheaper).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if settings.log.format == weightgate::config::LogFormat::Json {
        logs.json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        logs.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weightgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weightgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Delivers what a command queued, so mail goes out even when no server runs.
async fn deliver_mail(settings: &Settings, core: &Core) {
    match Mailer::new(settings, core.db.clone()) {
        Ok(m) => {
            if let Err(e) = m.deliver_due().await {
                tracing::warn!(error = %e, "mail left in the outbox for the server to deliver");
            }
        }
        Err(e) => tracing::warn!(error = %e, "mail left in the outbox"),
    }
}

async fn open(settings: &Settings) -> anyhow::Result<Core> {
    let s = settings.clone();
    tokio::task::spawn_blocking(move || Core::open(&s)).await?
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => serve(settings).await?,
        Command::Migrate => {
            let core = open(&settings).await?;
            println!(
                "database is up to date ({} migrations ran now)",
                core.db.migrated
            );
        }
        Command::Models(ModelsCmd::Scrub { repo, out }) => {
            let core = open(&settings).await?;
            let report = weightgate::integrity::scrub(
                &core.db,
                &core.store,
                &settings.mail.admin_emails,
                repo.as_deref(),
                settings.storage.chunk_size,
            )
            .await?;
            deliver_mail(&settings, &core).await;
            if out.json {
                print_json(&report)?;
            } else {
                println!(
                    "checked {} files: {} ok, {} quarantined now, {} released, {} unreadable",
                    report.checked,
                    report.ok,
                    report.quarantined.len(),
                    report.restored.len(),
                    report.unreadable.len()
                );
                for (sha, problem) in &report.quarantined {
                    println!("QUARANTINED {sha}: {problem}");
                }
                for (sha, problem) in &report.unreadable {
                    println!("UNREADABLE {sha}: {problem}");
                }
            }
            if !report.quarantined.is_empty() || !report.unreadable.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Models(cmd) => models(cmd, &settings).await?,
        Command::Admin(cmd) => admin_cmd(cmd, &settings).await?,
        Command::Webhooks(cmd) => webhooks_cmd(cmd, &settings).await?,
        Command::Users(UsersCmd::Delete { email }) => {
            let core = open(&settings).await?;
            core.db
                .write(move |c| access::delete_user(c, &email, "cli"))
                .await?;
            println!("deleted; their grants and tokens no longer work");
        }
        Command::Keys(KeysCmd::Retire { kid }) => {
            let core = open(&settings).await?;
            core.keys.retire(&kid)?;
            let k = kid.clone();
            core.db
                .write(move |c| {
                    audit::append(
                        c,
                        &[audit::Event::new("key_retired", "ok")
                            .actor("cli")
                            .detail(serde_json::json!({"kid": k}))],
                    )
                })
                .await?;
            println!("retired {kid}: tokens it signed no longer verify");
        }
        Command::Keys(KeysCmd::List { out }) => {
            let core = open(&settings).await?;
            let keys = core.keys.list()?;
            if out.json {
                print_json(&keys)?;
            } else {
                for k in keys {
                    let state = if k.signing {
                        "signing"
                    } else if k.retired_at.is_some() {
                        "retired"
                    } else {
                        "verifying"
                    };
                    println!(
                        "{}\t{state}\tcreated {}",
                        k.kid,
                        util::rfc3339(k.created_at)
                    );
                }
            }
        }
        Command::Verify { dir, out } => return verify_dir(&dir, out.json),
        Command::Download { .. } | Command::Apply { .. } | Command::Status { .. } => {
            unreachable!("client commands run before the configuration is read")
        }
        Command::Applications(cmd) => applications_cmd(cmd, &settings).await?,
        Command::Tokens(cmd) => tokens(cmd, &settings).await?,
        Command::Keys(KeysCmd::Rotate { out }) => {
            let core = open(&settings).await?;
            let kid = core.keys.generate()?;
            let db = core.db.clone();
            let k = kid.clone();
            db.write(move |c| {
                audit::append(
                    c,
                    &[audit::Event::new("key_rotated", "ok")
                        .actor("cli")
                        .detail(serde_json::json!({"kid": k}))],
                )
            })
            .await?;
            if out.json {
                print_json(&serde_json::json!({"kid": kid}))?
            } else {
                println!("new signing key {kid}; earlier keys keep verifying")
            }
        }
        Command::Audit(AuditCmd::Verify {
            archive,
            checkpoints,
            out,
        }) => {
            return audit_verify(&settings, archive, checkpoints, out.json).await;
        }
        Command::Audit(AuditCmd::Export {
            format,
            since,
            model,
        }) => {
            let since = since.as_deref().map(parse_time).transpose()?;
            export(&settings, &format, since, model).await?
        }
        Command::Audit(AuditCmd::Checkpoint) => {
            let core = open(&settings).await?;
            let cp = weightgate::jobs::write_checkpoint(&settings, &core.db).await?;
            print_json(&cp)?;
        }
        Command::Audit(AuditCmd::Archive { before, out }) => {
            let before = parse_time(&before)?;
            let core = open(&settings).await?;
            let through = core
                .db
                .read(move |c| audit_rows::last_seq_before(c, before * 1000))
                .await?;
            let Some(through) = through else {
                anyhow::bail!("no events before that time")
            };
            let report = audit::archive(&core.db, through, &out).await?;
            println!(
                "archived rows 1..={} to {} (last hash {})",
                report.through_seq,
                out.display(),
                report.last_hash
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let addr = settings.bind_addr()?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("server.bind: cannot listen on {addr}"))?;
    let core = open(&settings).await?;
    let models = core.db.read(catalog::list_models).await?;
    drop(core);
    let bound = listener.local_addr()?;
    eprintln!(
        "weightgate listening on {bound} (public URL {})",
        settings.public_url()
    );
    if models.is_empty() {
        eprintln!(
            "No models yet. Import one with:\n  weightgate models add ORG/NAME --from /path/to/folder"
        );
    }
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        return;
                    }
                };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    };
    weightgate::run(settings, listener, shutdown).await
}

async fn models(cmd: ModelsCmd, settings: &Settings) -> anyhow::Result<()> {
    let core = open(settings).await?;
    match cmd {
        ModelsCmd::Add {
            repo,
            from,
            from_bucket,
            from_upstream,
            gating,
            revision,
            description,
            license,
            out,
        } => {
            let req = ImportRequest {
                repo_id: repo,
                dir: from.unwrap_or_default(),
                revision,
                gating,
                description,
                license,
                block_size: settings.storage.block_size,
            };
            let report = match (from_bucket, from_upstream) {
                (Some(prefix), _) => {
                    import::import_in_place(&core.db, &core.store, req, &prefix).await?
                }
                (None, true) => import::import_from_upstream(&core.db, &core.store, req).await?,
                (None, false) => import::import(&core.db, &core.store, req).await?,
            };
            if out.json {
                print_json(&report)?;
            } else {
                for f in &report.files {
                    println!("{}  {}  ({} bytes)", f.sha256, f.path, f.size);
                }
                let what = if report.changed {
                    "now points to"
                } else {
                    "unchanged at"
                };
                println!(
                    "{} {} {what} commit {} ({} files)",
                    report.model,
                    report.revision,
                    report.commit,
                    report.files.len()
                );
            }
        }
        ModelsCmd::Scrub { .. } => unreachable!("handled in dispatch"),
        ModelsCmd::List { out } => {
            let rows = core
                .db
                .read(|c| {
                    let mut out = Vec::new();
                    for m in catalog::list_models(c)? {
                        let main = catalog::ref_commit(c, &m.id, "main")?;
                        out.push(serde_json::json!({"id": m.id, "gating": m.gating, "main": main}));
                    }
                    Ok(out)
                })
                .await?;
            if out.json {
                print_json(&rows)?;
            } else {
                for r in rows {
                    println!(
                        "{}\tgating={}\tmain={}",
                        r["id"].as_str().unwrap_or(""),
                        r["gating"].as_str().unwrap_or(""),
                        r["main"].as_str().unwrap_or("-")
                    );
                }
            }
        }
    }
    Ok(())
}

async fn applications_cmd(cmd: ApplicationsCmd, settings: &Settings) -> anyhow::Result<()> {
    let core = open(settings).await?;
    let ctx = weightgate::context(settings);
    match cmd {
        ApplicationsCmd::List { status, model, out } => {
            let apps = core
                .db
                .read(move |c| people::list_applications(c, status.as_deref(), model.as_deref()))
                .await?;
            if out.json {
                print_json(&apps)?;
            } else {
                for a in apps {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        a.id,
                        a.status,
                        a.model_id,
                        a.name.replace('\t', " "),
                        a.country,
                        util::rfc3339(a.created_at)
                    );
                }
            }
        }
        ApplicationsCmd::Approve { id, expires, out } => {
            let expires = expires
                .as_deref()
                .map(util::parse_duration)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
            let grant = applications::approve(&core.db, &ctx, &id, "cli", expires).await?;
            deliver_mail(settings, &core).await;
            if out.json {
                print_json(&grant)?
            } else {
                println!(
                    "approved {id}: grant {} (expires {})",
                    grant.id,
                    grant
                        .expires_at
                        .map(util::rfc3339)
                        .unwrap_or_else(|| "never".into())
                )
            }
        }
        ApplicationsCmd::Reject { id, reason, out } => {
            let app = applications::reject(&core.db, &ctx, &id, "cli", &reason).await?;
            deliver_mail(settings, &core).await;
            if out.json {
                print_json(&app)?
            } else {
                println!("rejected {id}")
            }
        }
    }
    Ok(())
}

async fn tokens(cmd: TokensCmd, settings: &Settings) -> anyhow::Result<()> {
    let core = open(settings).await?;
    match cmd {
        TokensCmd::Issue {
            email,
            model,
            ttl,
            max_downloads,
            label,
            out,
        } => {
            let ttl = util::parse_duration(ttl.as_deref().unwrap_or(&settings.tokens.default_ttl))
                .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            let (keys, policy) = (core.keys.clone(), weightgate::token_policy(settings));
            let email = email.trim().to_ascii_lowercase();
            let issued = core
                .db
                .write(move |c| {
                    let user = people::find_user_by_email(c, &email)?.ok_or_else(|| {
                        weightgate::error::Error::not_found(
                            "user_not_found",
                            "No researcher with that email address.",
                        )
                    })?;
                    access::issue(
                        c,
                        &keys,
                        &policy,
                        &IssueRequest {
                            user_id: user.id,
                            model,
                            ttl,
                            max_downloads,
                            label,
                            actor: "cli".into(),
                        },
                    )
                })
                .await?;
            if out.json {
                print_json(&issued)?
            } else {
                println!("{}", issued.token)
            }
        }
        TokensCmd::Revoke { jti, out } => {
            let ctx = weightgate::context(settings);
            let row = core
                .db
                .write(move |c| applications::revoke_token_in(c, &ctx, &jti, "cli"))
                .await?;
            deliver_mail(settings, &core).await;
            if out.json {
                print_json(&row)?
            } else {
                println!("revoked {}", row.jti)
            }
        }
    }
    Ok(())
}

async fn export(
    settings: &Settings,
    format: &str,
    since: Option<i64>,
    model: Option<String>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let core = open(settings).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if format == "csv" {
        writeln!(out, "{}", audit::CSV_HEADER)?;
    }
    let mut after = 0;
    loop {
        let m = model.clone();
        let page = core
            .db
            .read(move |c| {
                audit_rows::page_filtered(c, after, 1000, since.map(|s| s * 1000), m.as_deref())
            })
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            if format == "csv" {
                writeln!(out, "{}", audit::csv_line(r))?;
            } else {
                writeln!(out, "{}", audit::export_value(r))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// RFC 3339 or a plain date, as Unix seconds.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp())
        .ok_or_else(|| {
            anyhow::anyhow!("{s:?} is not a time like 2026-01-31 or 2026-01-31T12:00:00Z")
        })
}

async fn audit_verify(
    settings: &Settings,
    archive: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let core = open(settings).await?;
    let mut problems = Vec::new();
    let mut from = None;
    let mut archived = None;
    if let Some(path) = &archive {
        let v = audit::verify_archive(path)?;
        if let Some(at) = v.broken_at {
            problems.push(format!(
                "archive {}: broken at row {at}: {}",
                path.display(),
                v.problem.clone().unwrap_or_default()
            ));
        }
        from = Some((v.head_seq, v.head.clone()));
        archived = Some(v);
    }
    let verdict = core.db.read(move |c| audit::verify(c, from)).await?;
    if let Some(at) = verdict.broken_at {
        problems.push(format!(
            "broken at row {at}: {}",
            verdict.problem.clone().unwrap_or_default()
        ));
    }
    if let Some(path) = &checkpoints {
        let cps = audit::read_checkpoints(path)?;
        problems.extend(
            core.db
                .read(move |c| audit::check_checkpoints(c, &cps))
                .await?,
        );
    }
    if json {
        print_json(&serde_json::json!({
            "rows": verdict.rows, "head_seq": verdict.head_seq, "head": verdict.head,
            "broken_at": verdict.broken_at, "problem": verdict.problem, "starts_after": verdict.starts_after,
            "archive_rows": archived.as_ref().map(|a| a.rows), "problems": problems,
        }))?;
    } else {
        for p in &problems {
            println!("BROKEN: {p}");
        }
        if let Some((seq, hash)) = &verdict.starts_after {
            println!(
                "note: rows 1..={seq} were archived (the log continues from hash {hash}); pass --archive FILE to check them"
            );
        }
        if problems.is_empty() {
            println!(
                "ok: {} rows, head row {} hash {}",
                verdict.rows + archived.map(|a| a.rows).unwrap_or(0),
                verdict.head_seq,
                verdict.head
            );
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `weightgate verify DIR`: hashes every file listed in DIR/SHA256SUMS.
fn verify_dir(dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let sums_path = dir.join("SHA256SUMS");
    let text =
        std::fs::read_to_string(&sums_path).with_context(|| format!("{}", sums_path.display()))?;
    let sums = import::parse_sha256sums(&text)?;
    let mut entries: Vec<(String, String)> = sums.into_iter().collect();
    entries.sort();
    let total: u64 = entries
        .iter()
        .filter_map(|(p, _)| std::fs::metadata(dir.join(p)).ok())
        .map(|m| m.len())
        .sum();
    let bar = if std::io::stderr().is_terminal() && !json {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut bad = Vec::new();
    for (path, expected) in &entries {
        bar.set_message(path.clone());
        let hashed = std::fs::File::open(dir.join(path))
            .and_then(|f| weightgate::util::sha256_of_reader(f, |n| bar.inc(n)));
        let problem = match hashed {
            Err(e) => Some(format!("cannot read: {e}")),
            Ok(actual) => {
                (actual != *expected).then(|| format!("SHA-256 is {actual}, expected {expected}"))
            }
        };
        if let Some(p) = problem {
            bad.push((path.clone(), p));
        }
    }
    bar.finish_and_clear();
    if json {
        print_json(
            &serde_json::json!({"checked": entries.len(), "bad": bad.iter().map(|(p, why)| serde_json::json!({"path": p, "problem": why})).collect::<Vec<_>>()}),
        )?;
    } else {
        for (p, why) in &bad {
            println!("FAILED {p}: {why}");
        }
        println!(
            "{} of {} files verified",
            entries.len() - bad.len(),
            entries.len()
        );
    }
    Ok(if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn admin_cmd(cmd: AdminCmd, settings: &Settings) -> anyhow::Result<()> {
    use weightgate::auth::admin;
    let core = open(settings).await?;
    match cmd {
        AdminCmd::Create { email, out } => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("Password for {email} (at least 12 characters; input is shown): ");
            }
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            let created = core
                .db
                .write(move |c| admin::create(c, &email, &password, "cli"))
                .await?;
            if out.json {
                print_json(&serde_json::json!({"id": created.id, "email": created.email}))?;
            } else {
                println!("administrator {} created", created.email);
            }
        }
        AdminCmd::Token(AdminTokenCmd::Create { email, label, out }) => {
            let (raw, row) = core
                .db
                .write(move |c| admin::issue_token(c, &email, &label, "cli"))
                .await?;
            if out.json {
                print_json(&serde_json::json!({"token": raw, "id": row.id, "label": row.label}))?;
            } else {
                println!("{raw}");
            }
        }
        AdminCmd::Token(AdminTokenCmd::Revoke { id }) => {
            let revoked = core
                .db
                .write(move |c| weightgate::db::models::admins::revoke_token(c, &id, util::now()))
                .await?;
            if !revoked {
                anyhow::bail!("no live administrator token with that id");
            }
            println!("revoked");
        }
    }
    Ok(())
}

async fn webhooks_cmd(cmd: WebhooksCmd, settings: &Settings) -> anyhow::Result<()> {
    use weightgate::db::models::webhooks as rows;
    let core = open(settings).await?;
    match cmd {
        WebhooksCmd::Add {
            url,
            secret,
            events,
            out,
        } => {
            let w = core
                .db
                .write(move |c| {
                    let w = weightgate::webhooks::add(c, &url, &secret, &events)?;
                    audit::append(
                        c,
                        &[audit::Event::new("webhook_added", "ok")
                            .actor("cli")
                            .detail(serde_json::json!({"webhook": w.id, "events": w.events}))],
                    )?;
                    Ok(w)
                })
                .await?;
            if out.json {
                print_json(&w)?
            } else {
                println!("webhook {} added", w.id)
            }
        }
        WebhooksCmd::List { out } => {
            let list = core.db.read(rows::list).await?;
            if out.json {
                print_json(&list)?;
            } else {
                for w in list {
                    println!(
                        "{}\t{}\t{}\t{}",
                        w.id,
                        w.url,
                        w.events,
                        if w.disabled_at.is_some() {
                            "removed"
                        } else {
                            "active"
                        }
                    );
                }
            }
        }
        WebhooksCmd::Deliveries { id, out } => {
            let list = core.db.read(move |c| rows::deliveries(c, &id, 200)).await?;
            if out.json {
                print_json(&list)?;
            } else {
                for d in list {
                    let state = if d.sent_at.is_some() {
                        "delivered"
                    } else if d.failed_at.is_some() {
                        "failed"
                    } else {
                        "pending"
                    };
                    println!(
                        "{}\t{}\t{state}\tattempts={}\t{}",
                        d.id,
                        d.event,
                        d.attempts,
                        d.last_error.unwrap_or_default()
                    );
                }
            }
        }
        WebhooksCmd::Remove { id } => {
            if !core
                .db
                .write(move |c| rows::disable(c, &id, util::now()))
                .await?
            {
                anyhow::bail!("no active webhook with that id");
            }
            println!("removed");
        }
    }
    Ok(())
}
