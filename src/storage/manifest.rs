//! What import records about each file: size, whole-file SHA-256 (its public identity),
//! the Hub's git object id for an LFS entry, and the BLAKE3 block manifest that every
//! fetch is verified against.

use sha1::{Digest as _, Sha1};
use sha2::Sha256;

/// The algorithm named in every block manifest.
pub const BLOCK_ALGO: &str = "blake3";
/// Length of one block hash in the packed `block_hashes` column.
pub const HASH_LEN: usize = 32;

/// Hashes a file's bytes as they stream past, block by block.
pub struct Hasher {
    block_size: u64,
    sha256: Sha256,
    block: blake3::Hasher,
    in_block: u64,
    size: u64,
    blocks: Vec<u8>,
}

/// The finished digest of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
    pub block_size: u64,
    pub block_hashes: Vec<u8>,
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
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.sha256.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = (self.block_size - self.in_block) as usize;
            let take = room.min(data.len());
            self.block.update(&data[..take]);
            self.in_block += take as u64;
            data = &data[take..];
            if self.in_block == self.block_size {
                self.blocks
                    .extend_from_slice(self.block.finalize().as_bytes());
                self.block.reset();
                self.in_block = 0;
            }
        }
    }

    pub fn finish(mut self) -> Digest {
        if self.in_block > 0 {
            self.blocks
                .extend_from_slice(self.block.finalize().as_bytes());
        }
        Digest {
            size: self.size,
            sha256: hex::encode(self.sha256.finalize()),
            block_size: self.block_size,
            block_hashes: self.blocks,
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
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&data)));
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
