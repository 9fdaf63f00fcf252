-- Leaner audit rows: seq becomes the rowid and hash loses its UNIQUE index (the chain, not an
-- index, keeps hashes apart, and nothing looks a row up by its hash). Appending an event then
-- touches two b-trees instead of four, which is most of what a download's commit costs.
CREATE TABLE audit_events_new (
    seq INTEGER PRIMARY KEY NOT NULL,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    actor TEXT,
    model_id TEXT,
    detail TEXT NOT NULL,                      -- canonical JSON
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_events_new (seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash)
    SELECT seq, ts_ms, kind, outcome, actor, model_id, detail, prev_hash, hash FROM audit_events;
DROP TABLE audit_events;
ALTER TABLE audit_events_new RENAME TO audit_events;
CREATE INDEX audit_events_kind ON audit_events(kind, ts_ms);
