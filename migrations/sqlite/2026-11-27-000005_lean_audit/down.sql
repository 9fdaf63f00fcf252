CREATE TABLE audit_events_old (
    seq BIGINT PRIMARY KEY NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    actor TEXT,
    model_id TEXT,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
INSERT INTO audit_events_old (seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash)
    SELECT seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash FROM audit_events;
DROP TABLE audit_events;
ALTER TABLE audit_events_old RENAME TO audit_events;
CREATE INDEX audit_events_kind ON audit_events(kind, ts_ms);
