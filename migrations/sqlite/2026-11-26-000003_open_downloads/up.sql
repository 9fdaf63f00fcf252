-- Downloads whose `started` audit event is committed and whose end is not yet: maintained by
-- the audit writer in the same transactions, so that after a crash the server can record
-- each as aborted when it starts again. `instance` names the server process family (kept in
-- its data dir) so that a replica closes only its own.
CREATE TABLE open_downloads (
    id TEXT PRIMARY KEY NOT NULL,
    instance TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    model_id TEXT,
    detail TEXT NOT NULL
);

-- One open application per researcher and model, even under concurrent submissions.
CREATE UNIQUE INDEX applications_one_open ON applications(user_id, model_id)
    WHERE status IN ('unverified', 'pending');
