-- Downloads whose `started` audit event is committed and whose end is not yet: maintained by
-- the audit writer in the same transactions, so that after a crash the server can record
-- each as aborted when it starts again.
CREATE TABLE open_downloads (
    id TEXT PRIMARY KEY NOT NULL,
    started_ms BIGINT NOT NULL,
    model_id TEXT,
    detail TEXT NOT NULL
);
