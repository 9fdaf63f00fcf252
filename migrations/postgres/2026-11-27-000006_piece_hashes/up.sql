-- BLAKE3 chaining values of each 128 KiB piece, packed; empty for blobs recorded before
-- pieces existed or whose block size is not a whole number (two or more) of pieces.
ALTER TABLE blobs ADD COLUMN piece_hashes BYTEA NOT NULL DEFAULT '';
