ALTER TABLE audit_events ADD CONSTRAINT audit_events_hash_key UNIQUE (hash);
