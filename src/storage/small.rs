//! Small local files kept in memory, to save the open, read, hash and close of every request.
//!
//! A copy is kept only after its bytes were read from the disk and verified against the
//! block hash; from then on it is served as it is, the way verified blocks are shared between
//! concurrent streams (`storage::shared`): the check is of what comes off the disk. The file
//! stays open beside its copy, and each request takes one `fstat` of that handle (no path
//! lookup): the copy is used only while the file's metadata (device, inode, size, mtime,
//! ctime) is what it was when the copy was read, the file still has a name (a delete, or a
//! rename over it, leaves the old inode with no links), and for at most `MAX_AGE`. So any
//! write, truncation, replacement or removal of the file sends the next request to the disk,
//! where the damage is found and reported. What the copy cannot see, until it expires and the
//! disk is read again (within `MAX_AGE`), is a change that leaves the file itself alone: bit
//! rot below the filesystem or a write to the block device (a plain read misses that too,
//! while the page cache holds the file), or a change of the path above the file (a folder
//! renamed or swapped, a symbolic link pointed elsewhere, a mount over the folder). Either
//! way the copy's bytes are still those the manifest names.
//!
//! File timestamps advance in ticks, so a write in the same tick as the last one could keep
//! the same times. A copy is therefore only kept once the file has been unchanged for
//! `settle` (its ctime that far in the past), the way git treats "racily clean" entries.
//! At most `MAX_ENTRIES` copies are kept, and no more than a quarter of the process's limit
//! on open files, which bounds the handles held open; copies past `MAX_AGE` are dropped
//! whenever another is kept, so a removed file's handle (and its disk space) is not held for
//! long.

use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::budget::{Budgeted, Weighed};

/// How long a file must have been unchanged before a copy of it is kept: well above any
/// filesystem's timestamp granularity.
pub const SETTLE: Duration = Duration::from_secs(2);

/// How long a copy is used before the disk is read again.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// How many copies are kept at most (each holds its file open).
pub const MAX_ENTRIES: usize = 1024;

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
    /// The file the copy was read from, held open for the `fstat` of each use.
    file: std::sync::Arc<std::fs::File>,
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
    max_entries: usize,
    settle: Duration,
}

impl SmallFiles {
    /// A cache of at most `max_bytes` of file contents (0 keeps nothing).
    pub fn new(max_bytes: usize, settle: Duration) -> SmallFiles {
        SmallFiles {
            entries: Default::default(),
            max_bytes,
            max_entries: MAX_ENTRIES.min(crate::util::open_files_limit() / 4),
            settle,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// The copy of `key` when it was verified against `hash`, is younger than `MAX_AGE`, and
    /// its file is still linked and has the metadata of the version it was read from. A copy
    /// found stale is dropped, closing its file.
    pub fn get(&self, key: &str, hash: &[u8]) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let (file, identity, bytes) = {
            let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
            let e = entries.get(key)?;
            if e.hash[..] != *hash {
                return None; // kept for another version of the manifest
            }
            let fresh = e.kept.elapsed() < MAX_AGE;
            (fresh.then(|| e.file.clone()), e.identity, e.bytes.clone())
        };
        // The `fstat` runs with no lock held, so a slow filesystem holds up only this request.
        use std::os::unix::fs::MetadataExt;
        let unchanged = |m: std::fs::Metadata| m.nlink() > 0 && Identity::of(&m) == identity;
        match file {
            Some(f) if f.metadata().is_ok_and(unchanged) => Some(bytes),
            _ => {
                self.forget(key);
                None
            }
        }
    }

    /// Drops the copy of `key`.
    pub fn forget(&self, key: &str) {
        let gone = {
            let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
            entries.remove(key)
        };
        drop(gone); // its file is closed here, after the lock
    }

    /// Keeps `bytes`, just verified against `hash`, as the content of `file` (the handle it
    /// was read through), if the file has settled.
    pub fn put(&self, key: &str, file: std::fs::File, hash: &[u8], bytes: &Bytes) {
        let Ok(hash) = <[u8; 32]>::try_from(hash) else {
            return;
        };
        if !self.enabled() {
            return;
        }
        let Ok(meta) = file.metadata() else { return };
        let identity = Identity::of(&meta);
        if bytes.len() as u64 != identity.size
            || bytes.len() > self.max_bytes
            || !identity.settled(self.settle)
        {
            return;
        }
        let entry = Entry {
            identity,
            file: std::sync::Arc::new(file),
            kept: std::time::Instant::now(),
            hash,
            bytes: bytes.clone(),
        };
        // What leaves the cache is dropped after the lock is released: closing files is a
        // system call each.
        let (replaced, expired, cleared) = {
            let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
            let replaced = entries.remove(key);
            let expired = entries.take_where(|e| e.kept.elapsed() >= MAX_AGE);
            let (held, count) = entries.usage();
            // Full: start over rather than track recency on every hit.
            let cleared = (held + bytes.len() > self.max_bytes || count >= self.max_entries)
                .then(|| std::mem::take(&mut *entries));
            entries.insert(key.to_string(), entry);
            (replaced, expired, cleared)
        };
        drop((replaced, expired, cleared));
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

    /// A folder holding the file `f` with `body`, and the file's path.
    fn file_with(body: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, body).unwrap();
        (dir, path)
    }

    fn open(path: &std::path::Path) -> std::fs::File {
        std::fs::File::open(path).unwrap()
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
        let (dir, path) = file_with(body);
        let cache = SmallFiles::new(1 << 20, Duration::ZERO);
        cache.put("f", open(&path), &[7; 32], &Bytes::from_static(body));
        (dir, path, cache)
    }

    #[test]
    fn a_copy_is_kept_only_for_the_version_it_was_read_from() {
        let (dir, path, cache) = kept(b"hello");
        let bytes = Bytes::from_static(b"hello");
        assert_eq!(cache.get("f", &[7; 32]), Some(bytes.clone()));
        assert_eq!(
            cache.get("f", &[8; 32]),
            None,
            "checked against another hash"
        );
        assert_eq!(cache.get("g", &[7; 32]), None);
        assert_eq!(cache.usage(), (5, 1), "a copy for another hash stays");
        // A write that changes the size misses, and the stale copy is dropped.
        std::fs::write(&path, b"hello!").unwrap();
        assert_eq!(cache.get("f", &[7; 32]), None);
        assert_eq!(cache.usage(), (0, 0));
        // So does a replacement by rename (the kept handle's inode loses its last link) ...
        std::fs::write(&path, b"hello").unwrap();
        cache.put("f", open(&path), &[7; 32], &bytes);
        assert_eq!(cache.get("f", &[7; 32]), Some(bytes.clone()));
        let other = dir.path().join("o");
        std::fs::write(&other, b"HELLO").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(cache.get("f", &[7; 32]), None, "a new inode");
        // ... and a removal.
        cache.put("f", open(&path), &[7; 32], &Bytes::from_static(b"HELLO"));
        assert_eq!(cache.usage(), (5, 1));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(cache.get("f", &[7; 32]), None, "gone");
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn a_file_with_no_name_left_misses() {
        let (_dir, path, cache) = kept(b"hello");
        std::fs::remove_file(&path).unwrap();
        // Make the kept metadata that of the unlinked file, so that only its link count
        // tells it apart.
        change(&cache, |e| {
            e.identity = Identity::of(&e.file.metadata().unwrap())
        });
        assert_eq!(cache.get("f", &[7; 32]), None);
    }

    #[test]
    fn expired_copies_are_dropped_when_another_is_kept() {
        let (dir, _path, cache) = kept(b"hello");
        let Some(old) = std::time::Instant::now().checked_sub(MAX_AGE) else {
            return; // a monotonic clock younger than MAX_AGE: nothing to age
        };
        change(&cache, |e| e.kept = old);
        let other = dir.path().join("g");
        std::fs::write(&other, b"hi").unwrap();
        cache.put("g", open(&other), &[7; 32], &Bytes::from_static(b"hi"));
        assert_eq!(cache.usage(), (2, 1), "only the new copy is held");
    }

    #[test]
    fn a_change_of_ctime_alone_misses() {
        let (_dir, path, cache) = kept(b"hello");
        let meta = std::fs::metadata(&path).unwrap();
        let mut id = Identity::of(&meta);
        id.ctime.1 = (id.ctime.1 + 1) % 1_000_000_000;
        assert_ne!(id, Identity::of(&meta));
        assert!(cache.get("f", &[7; 32]).is_some());
        change(&cache, |e| e.identity = id);
        assert_eq!(cache.get("f", &[7; 32]), None);
    }

    #[test]
    fn a_copy_expires() {
        let (_dir, _path, cache) = kept(b"hello");
        assert!(cache.get("f", &[7; 32]).is_some());
        let Some(old) = std::time::Instant::now().checked_sub(MAX_AGE) else {
            return; // a monotonic clock younger than MAX_AGE: nothing to age
        };
        change(&cache, |e| e.kept = old);
        assert_eq!(cache.get("f", &[7; 32]), None);
    }

    #[test]
    fn nothing_is_kept_while_the_file_may_still_change_unseen() {
        let (_dir, path) = file_with(b"fresh");
        let cache = SmallFiles::new(1 << 20, Duration::from_secs(3600));
        cache.put("f", open(&path), &[7; 32], &Bytes::from_static(b"fresh"));
        assert_eq!(cache.usage(), (0, 0), "changed within the hour: not kept");
        let off = SmallFiles::default();
        off.put("f", open(&path), &[7; 32], &Bytes::from_static(b"fresh"));
        assert_eq!(off.usage(), (0, 0), "the default keeps nothing");
        assert_eq!(off.get("f", &[7; 32]), None);
        let cache = SmallFiles::new(1 << 20, Duration::ZERO);
        cache.put("f", open(&path), &[7; 32], &Bytes::from_static(b"fresh!"));
        assert_eq!(
            cache.usage(),
            (0, 0),
            "bytes of another size than the file's"
        );
    }

    /// Keeps files of the given bodies under the keys "0", "1", ... in `cache`.
    fn put_all(cache: &SmallFiles, dir: &std::path::Path, bodies: &[&[u8]]) {
        for (i, body) in bodies.iter().enumerate() {
            let path = dir.join(i.to_string());
            std::fs::write(&path, body).unwrap();
            let bytes = Bytes::copy_from_slice(body);
            cache.put(&i.to_string(), open(&path), &[1; 32], &bytes);
            assert!(cache.usage().0 <= cache.max_bytes, "{:?}", cache.usage());
            assert!(cache.usage().1 <= cache.max_entries, "{:?}", cache.usage());
        }
    }

    #[test]
    fn the_cache_stays_within_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SmallFiles::new(10, Duration::ZERO);
        put_all(
            &cache,
            dir.path(),
            &[b"abcd", b"efgh", b"ijkl", b"0123456789a"],
        );
        // The third entry did not fit beside two others: the cache started over with it;
        // the last is larger than the whole cache and was never kept.
        assert_eq!(cache.usage(), (4, 1));
        assert!(cache.get("2", &[1; 32]).is_some());
    }

    #[test]
    fn the_cache_holds_at_most_max_entries_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SmallFiles {
            max_entries: 2,
            ..SmallFiles::new(1 << 20, Duration::ZERO)
        };
        put_all(&cache, dir.path(), &[b"a", b"b", b"c"]);
        assert_eq!(cache.usage(), (1, 1), "started over at the third");
        assert!(cache.get("2", &[1; 32]).is_some());
        assert!(cache.get("0", &[1; 32]).is_none());
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
