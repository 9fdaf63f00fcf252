-- weightgate schema (PostgreSQL). Times are Unix seconds unless the column says _ms.
CREATE TABLE models (
    id TEXT PRIMARY KEY NOT NULL,              -- "org/name"
    description TEXT NOT NULL DEFAULT '',
    license TEXT NOT NULL DEFAULT '',
    gating TEXT NOT NULL DEFAULT 'manual',     -- manual | auto | domain
    allowed_domains TEXT NOT NULL DEFAULT '[]',-- JSON array, for gating = domain
    country_allow TEXT NOT NULL DEFAULT '[]',  -- JSON array of ISO 3166-1 alpha-2
    country_deny TEXT NOT NULL DEFAULT '[]',
    questions TEXT NOT NULL DEFAULT '[]',      -- JSON array of custom form questions
    allow_reapply BOOLEAN NOT NULL DEFAULT TRUE,
    notify TEXT NOT NULL DEFAULT 'each',       -- each | digest
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Content-addressed stored bytes, one row per distinct SHA-256.
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY NOT NULL,
    size BIGINT NOT NULL,
    block_size BIGINT NOT NULL,
    block_algo TEXT NOT NULL,                  -- "blake3"
    block_hashes BYTEA NOT NULL,                -- 32 bytes per block, in order
    storage_key TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',         -- ok | quarantined
    status_reason TEXT,
    created_at BIGINT NOT NULL,
    verified_at BIGINT
);

CREATE TABLE revisions (
    model_id TEXT NOT NULL REFERENCES models(id),
    commit_sha TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, commit_sha)
);

CREATE TABLE refs (
    model_id TEXT NOT NULL REFERENCES models(id),
    name TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, name)
);

CREATE TABLE files (
    model_id TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    git_oid TEXT NOT NULL,                     -- sha1 of the LFS pointer, as the Hub's tree shows
    PRIMARY KEY (model_id, commit_sha, path),
    FOREIGN KEY (model_id, commit_sha) REFERENCES revisions(model_id, commit_sha)
);
CREATE INDEX files_sha256 ON files(sha256);

CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT NOT NULL UNIQUE,                -- lower-cased
    name TEXT NOT NULL DEFAULT '',
    affiliation TEXT NOT NULL DEFAULT '',
    country TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    deleted_at BIGINT
);

CREATE TABLE applications (
    id TEXT PRIMARY KEY NOT NULL,
    model_id TEXT NOT NULL REFERENCES models(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    status TEXT NOT NULL,                      -- unverified | pending | approved | rejected | withdrawn
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    affiliation TEXT NOT NULL,
    country TEXT NOT NULL,
    intended_use TEXT NOT NULL,
    answers TEXT NOT NULL DEFAULT '{}',        -- JSON object: the model's custom questions
    confirm_hash TEXT UNIQUE,                  -- SHA-256 of the emailed confirmation code
    status_key_hash TEXT NOT NULL,             -- SHA-256 of the status-page key
    reason TEXT,
    decided_by TEXT,
    decided_at BIGINT,
    created_at BIGINT NOT NULL,
    confirmed_at BIGINT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX applications_model_status ON applications(model_id, status);
CREATE INDEX applications_user ON applications(user_id);

CREATE TABLE grants (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    model_id TEXT NOT NULL REFERENCES models(id),
    application_id TEXT REFERENCES applications(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    revoked_reason TEXT
);
CREATE INDEX grants_user_model ON grants(user_id, model_id);

CREATE TABLE tokens (
    jti TEXT PRIMARY KEY NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,           -- SHA-256 of the raw token; the token itself is never stored
    kid TEXT NOT NULL,
    grant_id TEXT NOT NULL REFERENCES grants(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    model_id TEXT NOT NULL REFERENCES models(id),
    label TEXT NOT NULL DEFAULT '',
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    max_downloads BIGINT
);
CREATE INDEX tokens_grant ON tokens(grant_id);

-- Completed downloads per token and file content, for quotas (a file counts once).
CREATE TABLE token_downloads (
    jti TEXT NOT NULL REFERENCES tokens(jti),
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    completed_at BIGINT NOT NULL,
    PRIMARY KEY (jti, sha256)
);

CREATE TABLE admins (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,               -- Argon2id PHC string
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);

CREATE TABLE admin_sessions (
    id_hash TEXT PRIMARY KEY NOT NULL,
    admin_id TEXT NOT NULL REFERENCES admins(id),
    csrf_token TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE admin_api_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    admin_id TEXT NOT NULL REFERENCES admins(id),
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);

-- Small server-wide values (e.g. the one-time setup code's hash).
CREATE TABLE kv (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Append-only, hash-chained: hash = SHA-256(prev_hash || canonical(event)).
CREATE TABLE audit_events (
    seq BIGINT PRIMARY KEY NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    actor TEXT,
    model_id TEXT,
    detail TEXT NOT NULL,                      -- canonical JSON
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE INDEX audit_events_kind ON audit_events(kind, ts_ms);

-- Durable outbox: written in the same transaction as the change that causes the message.
CREATE TABLE mail_outbox (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    to_addr TEXT NOT NULL,
    subject TEXT NOT NULL,
    body_text TEXT NOT NULL,
    body_html TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at BIGINT,
    failed_at BIGINT,
    last_error TEXT
);
CREATE INDEX mail_outbox_due ON mail_outbox(sent_at, failed_at, next_attempt_at);

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL DEFAULT '["*"]',
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);

CREATE TABLE webhook_outbox (
    id TEXT PRIMARY KEY NOT NULL,
    webhook_id TEXT NOT NULL REFERENCES webhooks(id),
    event TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at BIGINT,
    failed_at BIGINT,
    last_error TEXT
);
