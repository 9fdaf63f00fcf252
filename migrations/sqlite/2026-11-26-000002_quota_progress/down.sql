DROP TABLE download_progress;
ALTER TABLE tokens DROP COLUMN last_used_at;
