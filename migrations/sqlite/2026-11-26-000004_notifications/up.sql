-- Webhook deliveries go out in the order of the audit events that caused them.
ALTER TABLE webhook_outbox ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_outbox ADD COLUMN last_status INTEGER;
CREATE INDEX webhook_outbox_due ON webhook_outbox(webhook_id, sent_at, failed_at, seq);

-- Which expiry notices a grant has had, so each is sent once.
ALTER TABLE grants ADD COLUMN expiry_warned_at BIGINT;
ALTER TABLE grants ADD COLUMN expiry_noticed_at BIGINT;

-- Applications waiting for a model's daily digest to administrators.
ALTER TABLE applications ADD COLUMN digest_sent_at BIGINT;
