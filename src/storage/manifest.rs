//! What import records about each file: size, whole-file SHA-256 (its public identity),
//! the Hub's git object id for an LFS entry, and the BLAKE3 block manifest that every
//! fetch is verified against.

use sha1::{Digest as _, Sha1};

use crate::util::Sha256;

/// The algorithm named in every block manifest.
pub const BLOCK_ALGO: &str = "blake3";
/// Length of one block hash in the packed `block_hashes` column.
pub const HASH_LEN: usize = 32;

/// Size of the pieces a block is verified in on the wire, when the block splits into at
/// least two (`pieces_apply`). A piece is a whole subtree of the block's BLAKE3 tree, so its
/// chaining value (CV) is bound to the block hash: the CVs of a block merge into exactly the
/// hash the manifest publishes (`block_root`). Streams check each piece against its CV before
/// sending it, which holds a stream to a piece of memory instead of a block.
pub const PIECE_SIZE: u64 = 128 << 10;

/// Whether blocks of `block_size` are recorded and served as pieces.
pub fn pieces_apply(block_size: u64) -> bool {
    block_size.is_multiple_of(PIECE_SIZE) && block_size >= 2 * PIECE_SIZE
}

/// The chaining value of a piece that starts `offset` bytes into its block.
pub fn piece_cv(offset: u64, data: &[u8]) -> [u8; HASH_LEN] {
    use blake3::hazmat::HasherExt;
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The BLAKE3 hash of a block of `len` bytes rebuilt from the CVs of its pieces (packed,
/// `HASH_LEN` each). `None` when the count does not fit `len` or the block is a single piece
/// (its hash is not a merge of CVs).
pub fn block_root(cvs: &[u8], len: u64) -> Option<[u8; HASH_LEN]> {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    fn subtree(cvs: &[[u8; HASH_LEN]], len: u64) -> ([u8; HASH_LEN], [u8; HASH_LEN]) {
        // Splits where BLAKE3 splits: the left side is the largest power-of-two number of
        // 1 KiB chunks that leaves something on the right, a whole number of pieces here.
        let left_len = blake3::hazmat::left_subtree_len(len);
        let n = (left_len / PIECE_SIZE) as usize;
        let merge = |part: &[[u8; HASH_LEN]], len| {
            if part.len() == 1 {
                part[0]
            } else {
                let (l, r) = subtree(part, len);
                merge_subtrees_non_root(&l, &r, Mode::Hash)
            }
        };
        (merge(&cvs[..n], left_len), merge(&cvs[n..], len - left_len))
    }
    let count = len.div_ceil(PIECE_SIZE) as usize;
    if count < 2 || cvs.len() != count * HASH_LEN {
        return None;
    }
    let cvs: Vec<[u8; HASH_LEN]> = cvs
        .chunks_exact(HASH_LEN)
        .map(|c| {
            let mut cv = [0; HASH_LEN];
            cv.copy_from_slice(c);
            cv
        })
        .collect();
    let (l, r) = subtree(&cvs, len);
    Some(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// Hashes a file's bytes as they stream past, block by block (and piece by piece when the
/// block size allows: one BLAKE3 pass then yields both, each block hash merged from its
/// pieces' CVs).
pub struct Hasher {
    block_size: u64,
    sha256: Sha256,
    /// The current block, or the current piece when pieces apply.
    block: blake3::Hasher,
    in_block: u64,
    size: u64,
    blocks: Vec<u8>,
    /// CVs of the pieces so far, when pieces apply.
    pieces: Option<Vec<u8>>,
    /// Where the current block's CVs start in `pieces`.
    block_first_cv: usize,
    /// The root hash of the current block's first piece, its hash if it stays alone.
    first_root: [u8; HASH_LEN],
}

/// The finished digest of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
    pub block_size: u64,
    pub block_hashes: Vec<u8>,
    /// Packed CVs of every `PIECE_SIZE` piece; empty unless `pieces_apply(block_size)`.
    pub piece_hashes: Vec<u8>,
}

impl Hasher {
    pub fn new(block_size: u64) -> Hasher {
        Hasher {
            block_size,
            sha256: Sha256::new(),
            block: blake3::Hasher::new(),
            in_block: 0,
            size: 0,
            blocks: Vec::new(),
            pieces: pieces_apply(block_size).then(Vec::new),
            block_first_cv: 0,
            first_root: [0; HASH_LEN],
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.sha256.update(data);
        self.size += data.len() as u64;
        let unit = self.unit();
        while !data.is_empty() {
            let room = (unit - self.in_block % unit) as usize;
            let take = room.min(data.len());
            self.block.update(&data[..take]);
            self.in_block += take as u64;
            data = &data[take..];
            if self.in_block.is_multiple_of(unit) {
                self.close_piece();
                if self.in_block == self.block_size {
                    self.close_block();
                } else {
                    use blake3::hazmat::HasherExt;
                    self.block.set_input_offset(self.in_block);
                }
            }
        }
    }

    /// What `block` hashes at a time: a piece when pieces apply, else a whole block.
    fn unit(&self) -> u64 {
        if self.pieces.is_some() {
            PIECE_SIZE
        } else {
            self.block_size
        }
    }

    /// Ends what the hasher covers (a piece, or a whole block without pieces; never empty).
    /// A block's first piece, at offset 0, also gives its root hash: the block's hash if the
    /// block stays one piece (and the hash of a whole block without pieces).
    fn close_piece(&mut self) {
        if self.pieces.is_none() || self.in_block <= PIECE_SIZE {
            self.first_root = *self.block.finalize().as_bytes();
        }
        if let Some(pieces) = &mut self.pieces {
            use blake3::hazmat::HasherExt;
            pieces.extend_from_slice(&self.block.finalize_non_root());
        }
        self.block = blake3::Hasher::new();
    }

    /// Records the hash of the block whose bytes are all closed: merged from its pieces' CVs,
    /// or the root hash `close_piece` kept when it is one piece (or has no pieces).
    fn close_block(&mut self) {
        let cvs = self.pieces.as_deref().unwrap_or_default();
        let hash =
            block_root(&cvs[self.block_first_cv..], self.in_block).unwrap_or(self.first_root);
        self.blocks.extend_from_slice(&hash);
        self.block_first_cv = cvs.len();
        self.in_block = 0;
    }

    pub fn finish(mut self) -> Digest {
        if self.in_block > 0 {
            if !self.in_block.is_multiple_of(self.unit()) {
                self.close_piece();
            }
            self.close_block();
        }
        Digest {
            size: self.size,
            sha256: hex::encode(self.sha256.finish()),
            block_size: self.block_size,
            block_hashes: self.blocks,
            piece_hashes: self.pieces.unwrap_or_default(),
        }
    }
}

/// Number of blocks a file of `size` bytes has (an empty file has none).
pub fn block_count(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}

/// The Git LFS pointer text the Hub would store for this content.
pub fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

/// The git blob id of `data` (`sha1("blob <len>\0" + data)`).
pub fn git_blob_oid(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex::encode(h.finalize())
}

/// A revision's commit id: 40 hex derived from the model id and every (path, size, sha256),
/// so it changes exactly when content changes.
pub fn commit_id(model: &str, entries: &[(String, u64, String)]) -> String {
    let mut sorted: Vec<&(String, u64, String)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha1::new();
    h.update(b"weightgate-revision-v1\0");
    h.update(model.as_bytes());
    h.update(b"\0");
    for (path, size, sha) in sorted {
        h.update(path.as_bytes());
        h.update(b"\0");
        h.update(size.to_string().as_bytes());
        h.update(b"\0");
        h.update(sha.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_split_at_the_block_size_whatever_the_write_sizes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut one = Hasher::new(4096);
        one.update(&data);
        let mut many = Hasher::new(4096);
        for piece in data.chunks(333) {
            many.update(piece);
        }
        let (a, b) = (one.finish(), many.finish());
        assert_eq!(a, b);
        assert_eq!(a.block_hashes.len(), 3 * HASH_LEN);
        assert_eq!(
            &a.block_hashes[..32],
            blake3::hash(&data[..4096]).as_bytes()
        );
        assert_eq!(
            &a.block_hashes[64..],
            blake3::hash(&data[8192..]).as_bytes()
        );
        assert_eq!(
            a.sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
        );
    }

    #[test]
    fn block_hashes_merged_from_pieces_equal_plain_blake3() {
        let p = PIECE_SIZE as usize;
        let data: Vec<u8> = (0..9 * p + 777).map(|i| (i * 31 + i / 7) as u8).collect();
        // Three pieces per block (not a power of two) and four; lengths that end a file on,
        // just before and just after piece and block edges.
        for block in [3 * p, 4 * p] {
            for len in [
                0,
                1,
                p - 1,
                p,
                p + 1,
                2 * p,
                block - 1,
                block,
                block + 1,
                block + p,
                2 * block + p + 5,
                data.len(),
            ] {
                let data = &data[..len];
                let mut h = Hasher::new(block as u64);
                for part in data.chunks(50_000) {
                    h.update(part);
                }
                let d = h.finish();
                let mut plain = Hasher::new(block as u64);
                plain.pieces = None;
                plain.update(data);
                let plain = plain.finish();
                assert_eq!(
                    d.block_hashes, plain.block_hashes,
                    "block {block}, len {len}"
                );
                for (i, b) in data.chunks(block).enumerate() {
                    assert_eq!(
                        &d.block_hashes[i * HASH_LEN..][..HASH_LEN],
                        blake3::hash(b).as_bytes()
                    );
                }
                let cvs = d.piece_hashes;
                assert_eq!(
                    cvs.len(),
                    len.div_ceil(p) * HASH_LEN,
                    "block {block}, len {len}"
                );
                for (i, piece) in data.chunks(p).enumerate() {
                    let offset = (i * p % block) as u64;
                    assert_eq!(&cvs[i * HASH_LEN..][..HASH_LEN], &piece_cv(offset, piece));
                }
            }
        }
    }

    #[test]
    fn a_wrong_piece_cv_does_not_merge_into_the_block_hash() {
        let p = PIECE_SIZE as usize;
        let data: Vec<u8> = (0..5 * p / 2).map(|i| (i % 253) as u8).collect();
        let mut h = Hasher::new(4 * PIECE_SIZE);
        h.update(&data);
        let d = h.finish();
        let mut cvs = d.piece_hashes;
        let len = data.len() as u64;
        assert_eq!(block_root(&cvs, len).unwrap()[..], d.block_hashes[..]);
        assert_eq!(block_root(&cvs[..64], len), None, "wrong count");
        assert_eq!(block_root(&cvs[..32], PIECE_SIZE), None, "one piece");
        cvs[40] ^= 1;
        assert_ne!(block_root(&cvs, len).unwrap()[..], d.block_hashes[..]);
    }

    #[test]
    fn pieces_apply_only_to_blocks_of_whole_pieces() {
        assert!(pieces_apply(8 << 20));
        assert!(pieces_apply(3 * PIECE_SIZE));
        assert!(!pieces_apply(PIECE_SIZE));
        assert!(!pieces_apply(64 << 10));
        assert!(!pieces_apply(3 * PIECE_SIZE + 4096));
    }

    #[test]
    fn git_oid_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_oid(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn commit_changes_with_content_only() {
        let a = vec![
            ("a.bin".to_string(), 3, "x".repeat(64)),
            ("b".to_string(), 1, "y".repeat(64)),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(commit_id("o/m", &a), commit_id("o/m", &b));
        b[0].1 = 4;
        assert_ne!(commit_id("o/m", &a), commit_id("o/m", &b));
        assert_ne!(commit_id("o/m", &a), commit_id("o/n", &a));
        assert_eq!(commit_id("o/m", &a).len(), 40);
    }
}
