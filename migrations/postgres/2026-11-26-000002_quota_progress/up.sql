-- When a token was last seen (updated at most once per cache period).
ALTER TABLE tokens ADD COLUMN last_used_at BIGINT;

-- Byte ranges of a file delivered under one token, until they cover the whole file and the
-- download counts as completed (token_downloads). ranges is a JSON array of [start, end).
CREATE TABLE download_progress (
    jti TEXT NOT NULL REFERENCES tokens(jti),
    sha256 TEXT NOT NULL,
    ranges TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (jti, sha256)
);
