//! Small local files kept in memory, to save the open, read and close of every request.
//!
//! A kept copy is used only while the file's metadata (device, inode, size, mtime, ctime,
//! read with one `stat` per request) is what it was when the copy was read, and for at most
//! `MAX_AGE`; its bytes are checked against the block hash on every request all the same
//! (see `verify::read_small`), so no byte leaves unverified and a copy that no longer
//! matches is dropped. What the copy cannot see is a change on disk that leaves the metadata
//! alone (bit rot below the filesystem, a write to the block device): that is caught when
//! the copy expires and the disk is read again, within `MAX_AGE`, instead of at the next
//! read that misses the page cache.
//!
//! File timestamps advance in ticks, so a write in the same tick as the last one could keep
//! the same times. A copy is therefore only kept once the file has been unchanged for
//! `settle` (its ctime that far in the past), the way git treats "racily clean" entries.

use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::budget::{Budgeted, Weighed};

/// How long a file must have been unchanged before a copy of it is kept: well above any
/// filesystem's timestamp granularity.
pub const SETTLE: Duration = Duration::from_secs(2);

/// How long a copy is used before the disk is read again.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file has been unchanged for at least `settle` (a ctime in the future, as
    /// after a clock step back, never is).
    fn settled(&self, settle: Duration) -> bool {
        let changed = SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(self.ctime.0).unwrap_or(0),
                u32::try_from(self.ctime.1).unwrap_or(0),
            ))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        SystemTime::now()
            .duration_since(changed)
            .is_ok_and(|age| age >= settle)
    }
}

struct Entry {
    identity: Identity,
    kept: std::time::Instant,
    /// The BLAKE3 hash the bytes were verified against.
    hash: [u8; 32],
    bytes: Bytes,
}

impl Weighed for Entry {
    fn weight(&self) -> usize {
        self.bytes.len()
    }
}

/// The cache; `Default` keeps nothing.
#[derive(Default)]
pub struct SmallFiles {
    entries: RwLock<Budgeted<String, Entry>>,
    max_bytes: usize,
    settle: Duration,
}

impl SmallFiles {
    /// A cache of at most `max_bytes` of file contents (0 keeps nothing).
    pub fn new(max_bytes: usize, settle: Duration) -> SmallFiles {
        SmallFiles {
            entries: Default::default(),
            max_bytes,
            settle,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// The copy of `key` (stored at `path`) when the file's metadata is still that of the
    /// version it was read from, it was verified against `hash`, and it is younger than
    /// `MAX_AGE`. The caller checks the bytes again before sending them.
    pub fn get(&self, key: &str, path: &Path, hash: &[u8]) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let (identity, bytes) = {
            let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
            let e = entries.get(key)?;
            if e.hash[..] != *hash || e.kept.elapsed() >= MAX_AGE {
                return None;
            }
            (e.identity, e.bytes.clone())
        };
        (Identity::of(&std::fs::metadata(path).ok()?) == identity).then_some(bytes)
    }

    /// Drops the copy of `key` (it failed its check).
    pub fn forget(&self, key: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }

    /// Keeps `bytes`, just verified against `hash`, as the content of the file `meta`
    /// describes (taken from the open file after the read), if the file has settled.
    pub fn put(&self, key: &str, meta: &std::fs::Metadata, hash: &[u8], bytes: &Bytes) {
        let identity = Identity::of(meta);
        let Ok(hash) = <[u8; 32]>::try_from(hash) else {
            return;
        };
        if !self.enabled()
            || bytes.len() as u64 != identity.size
            || bytes.len() > self.max_bytes
            || !identity.settled(self.settle)
        {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
        if entries.usage().0 + bytes.len() > self.max_bytes {
            // Full: start over rather than track recency on every hit.
            entries.clear();
        }
        entries.insert(
            key.to_string(),
            Entry {
                identity,
                kept: std::time::Instant::now(),
                hash,
                bytes: bytes.clone(),
            },
        );
    }

    /// Bytes held, and entries.
    pub fn usage(&self) -> (usize, usize) {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder holding the file `f` with `body`, the file's path and metadata.
    fn file_with(body: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, std::fs::Metadata) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, body).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        (dir, path, meta)
    }

    /// Alters the entry of `f` in place.
    fn change(cache: &SmallFiles, f: impl FnOnce(&mut Entry)) {
        let mut entries = cache.entries.write().unwrap();
        let mut e = entries.remove("f").unwrap();
        f(&mut e);
        entries.insert("f".into(), e);
    }

    /// A cache holding `body` as the copy of `f`, kept at once.
    fn kept(body: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf, SmallFiles) {
        let (dir, path, meta) = file_with(body);
        let cache = SmallFiles::new(1 << 20, Duration::ZERO);
        cache.put("f", &meta, &[7; 32], &Bytes::from_static(body));
        (dir, path, cache)
    }

    #[test]
    fn a_copy_is_kept_only_for_the_version_it_was_read_from() {
        let (dir, path, cache) = kept(b"hello");
        let meta = std::fs::metadata(&path).unwrap();
        let bytes = Bytes::from_static(b"hello");
        assert_eq!(cache.get("f", &path, &[7; 32]), Some(bytes.clone()));
        assert_eq!(
            cache.get("f", &path, &[8; 32]),
            None,
            "checked against another hash"
        );
        assert_eq!(cache.get("g", &path, &[7; 32]), None);
        // Any write that changes the size, or a replacement by rename, misses.
        std::fs::write(&path, b"hello!").unwrap();
        assert_eq!(cache.get("f", &path, &[7; 32]), None);
        cache.put("f", &meta, &[7; 32], &bytes);
        let other = dir.path().join("o");
        std::fs::write(&other, b"HELLO").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(cache.get("f", &path, &[7; 32]), None, "a new inode");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(cache.get("f", &path, &[7; 32]), None, "gone");
        assert_eq!(cache.usage(), (5, 1));
        cache.forget("f");
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn a_change_of_ctime_alone_misses() {
        let (_dir, path, cache) = kept(b"hello");
        let meta = std::fs::metadata(&path).unwrap();
        let mut id = Identity::of(&meta);
        id.ctime.1 = (id.ctime.1 + 1) % 1_000_000_000;
        assert_ne!(id, Identity::of(&meta));
        assert!(cache.get("f", &path, &[7; 32]).is_some());
        change(&cache, |e| e.identity = id);
        assert_eq!(cache.get("f", &path, &[7; 32]), None);
    }

    #[test]
    fn a_copy_expires() {
        let (_dir, path, cache) = kept(b"hello");
        assert!(cache.get("f", &path, &[7; 32]).is_some());
        let Some(old) = std::time::Instant::now().checked_sub(MAX_AGE) else {
            return; // a monotonic clock younger than MAX_AGE: nothing to age
        };
        change(&cache, |e| e.kept = old);
        assert_eq!(cache.get("f", &path, &[7; 32]), None);
    }

    #[test]
    fn nothing_is_kept_while_the_file_may_still_change_unseen() {
        let (_dir, path, meta) = file_with(b"fresh");
        let cache = SmallFiles::new(1 << 20, Duration::from_secs(3600));
        cache.put("f", &meta, &[7; 32], &Bytes::from_static(b"fresh"));
        assert_eq!(cache.usage(), (0, 0), "changed within the hour: not kept");
        let off = SmallFiles::default();
        off.put("f", &meta, &[7; 32], &Bytes::from_static(b"fresh"));
        assert_eq!(off.usage(), (0, 0), "the default keeps nothing");
        assert_eq!(off.get("f", &path, &[7; 32]), None);
    }

    #[test]
    fn the_cache_stays_within_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SmallFiles::new(10, Duration::ZERO);
        for (i, body) in [&b"abcd"[..], b"efgh", b"ijkl", b"0123456789a"]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(i.to_string());
            std::fs::write(&path, body).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            cache.put(
                &i.to_string(),
                &meta,
                &[1; 32],
                &Bytes::copy_from_slice(body),
            );
            assert!(cache.usage().0 <= 10, "{:?}", cache.usage());
        }
        // The third entry did not fit beside two others: the cache started over with it;
        // the last is larger than the whole cache and was never kept.
        assert_eq!(cache.usage(), (4, 1));
        let third = dir.path().join("2");
        assert!(cache.get("2", &third, &[1; 32]).is_some());
    }

    #[test]
    fn a_file_changed_in_the_future_is_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let mut id = Identity::of(&std::fs::metadata(&path).unwrap());
        assert!(id.settled(Duration::ZERO));
        id.ctime.0 += 3600;
        assert!(!id.settled(Duration::ZERO));
    }
}
