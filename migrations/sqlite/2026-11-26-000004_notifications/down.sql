DROP INDEX webhook_outbox_due;
ALTER TABLE webhook_outbox DROP COLUMN seq;
ALTER TABLE webhook_outbox DROP COLUMN last_status;
ALTER TABLE grants DROP COLUMN expiry_warned_at;
ALTER TABLE grants DROP COLUMN expiry_noticed_at;
ALTER TABLE applications DROP COLUMN digest_sent_at;
