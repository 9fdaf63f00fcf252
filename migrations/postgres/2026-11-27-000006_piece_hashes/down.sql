ALTER TABLE blobs DROP COLUMN piece_hashes;
