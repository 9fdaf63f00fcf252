//! Diesel table definitions, shared by the SQLite and PostgreSQL migrations.

diesel::table! {
    models (id) {
        id -> Text,
        description -> Text,
        license -> Text,
        gating -> Text,
        allowed_domains -> Text,
        country_allow -> Text,
        country_deny -> Text,
        questions -> Text,
        allow_reapply -> Bool,
        notify -> Text,
        created_at -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    blobs (sha256) {
        sha256 -> Text,
        size -> BigInt,
        block_size -> BigInt,
        block_algo -> Text,
        block_hashes -> Binary,
        storage_key -> Text,
        status -> Text,
        status_reason -> Nullable<Text>,
        created_at -> BigInt,
        verified_at -> Nullable<BigInt>,
        piece_hashes -> Binary,
    }
}

diesel::table! {
    revisions (model_id, commit_sha) {
        model_id -> Text,
        commit_sha -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    refs (model_id, name) {
        model_id -> Text,
        name -> Text,
        commit_sha -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    files (model_id, commit_sha, path) {
        model_id -> Text,
        commit_sha -> Text,
        path -> Text,
        size -> BigInt,
        sha256 -> Text,
        git_oid -> Text,
    }
}

diesel::table! {
    users (id) {
        id -> Text,
        email -> Text,
        name -> Text,
        affiliation -> Text,
        country -> Text,
        created_at -> BigInt,
        deleted_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    applications (id) {
        id -> Text,
        model_id -> Text,
        user_id -> Text,
        status -> Text,
        name -> Text,
        email -> Text,
        affiliation -> Text,
        country -> Text,
        intended_use -> Text,
        answers -> Text,
        confirm_hash -> Nullable<Text>,
        status_key_hash -> Text,
        reason -> Nullable<Text>,
        decided_by -> Nullable<Text>,
        decided_at -> Nullable<BigInt>,
        created_at -> BigInt,
        confirmed_at -> Nullable<BigInt>,
        updated_at -> BigInt,
        digest_sent_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    grants (id) {
        id -> Text,
        user_id -> Text,
        model_id -> Text,
        application_id -> Nullable<Text>,
        created_at -> BigInt,
        expires_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
        revoked_reason -> Nullable<Text>,
        expiry_warned_at -> Nullable<BigInt>,
        expiry_noticed_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    tokens (jti) {
        jti -> Text,
        token_hash -> Text,
        kid -> Text,
        grant_id -> Text,
        user_id -> Text,
        model_id -> Text,
        label -> Text,
        issued_at -> BigInt,
        expires_at -> BigInt,
        revoked_at -> Nullable<BigInt>,
        max_downloads -> Nullable<BigInt>,
        last_used_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    open_downloads (id) {
        id -> Text,
        instance -> Text,
        started_ms -> BigInt,
        model_id -> Nullable<Text>,
        detail -> Text,
    }
}

diesel::table! {
    download_progress (jti, sha256) {
        jti -> Text,
        sha256 -> Text,
        ranges -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    token_downloads (jti, sha256) {
        jti -> Text,
        sha256 -> Text,
        path -> Text,
        completed_at -> BigInt,
    }
}

diesel::table! {
    admins (id) {
        id -> Text,
        email -> Text,
        password_hash -> Text,
        created_at -> BigInt,
        disabled_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    admin_sessions (id_hash) {
        id_hash -> Text,
        admin_id -> Text,
        csrf_token -> Text,
        created_at -> BigInt,
        expires_at -> BigInt,
    }
}

diesel::table! {
    admin_api_tokens (id) {
        id -> Text,
        admin_id -> Text,
        token_hash -> Text,
        label -> Text,
        created_at -> BigInt,
        last_used_at -> Nullable<BigInt>,
        revoked_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    kv (key) {
        key -> Text,
        value -> Text,
        updated_at -> BigInt,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        ts_ms -> BigInt,
        kind -> Text,
        outcome -> Text,
        actor -> Nullable<Text>,
        model_id -> Nullable<Text>,
        detail -> Text,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::table! {
    mail_outbox (id) {
        id -> Text,
        kind -> Text,
        to_addr -> Text,
        subject -> Text,
        body_text -> Text,
        body_html -> Text,
        created_at -> BigInt,
        attempts -> Integer,
        next_attempt_at -> BigInt,
        sent_at -> Nullable<BigInt>,
        failed_at -> Nullable<BigInt>,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    webhooks (id) {
        id -> Text,
        url -> Text,
        secret -> Text,
        events -> Text,
        created_at -> BigInt,
        disabled_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    webhook_outbox (id) {
        id -> Text,
        webhook_id -> Text,
        event -> Text,
        payload -> Text,
        created_at -> BigInt,
        attempts -> Integer,
        next_attempt_at -> BigInt,
        sent_at -> Nullable<BigInt>,
        failed_at -> Nullable<BigInt>,
        last_error -> Nullable<Text>,
        seq -> BigInt,
        last_status -> Nullable<Integer>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    models,
    blobs,
    revisions,
    refs,
    files,
    users,
    applications,
    grants,
    tokens,
    token_downloads,
    admins,
    admin_sessions,
    admin_api_tokens,
    kv,
    audit_events,
    mail_outbox,
    webhooks,
    webhook_outbox,
    download_progress,
    open_downloads,
);
