DROP TABLE webhook_outbox; DROP TABLE webhooks; DROP TABLE mail_outbox; DROP TABLE audit_events;
DROP TABLE kv; DROP TABLE admin_api_tokens; DROP TABLE admin_sessions; DROP TABLE admins;
DROP TABLE token_downloads; DROP TABLE tokens; DROP TABLE grants; DROP TABLE applications;
DROP TABLE users; DROP TABLE files; DROP TABLE refs; DROP TABLE revisions; DROP TABLE blobs; DROP TABLE models;
