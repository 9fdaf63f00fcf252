//! The catalog epoch: a value that changes whenever models, revisions, files or blobs
//! change, so that request paths can cache catalog lookups and still see a quarantine, a
//! re-import or a new revision at once.
//!
//! Catalog writers call [`catalog_changed`] inside their transaction; `Db::write_blocking`
//! then bumps the epoch after the commit. In this process that is a counter; for other
//! processes on the same data dir (the CLI beside the server) it is the file
//! `<data_dir>/catalog.epoch`, which grows by one byte on each change (appends are atomic
//! across processes), so its size never repeats; the inode and mtime tell a rotated file
//! apart. Readers keep the file open and `fstat` it (no path lookup per request); a file
//! that has reached its rotation size sends them back to the path. Processes on other
//! machines see changes once their cache entries age out (the same bound as token
//! revocation).

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    static CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current transaction as one that changes the catalog.
pub fn catalog_changed() {
    CHANGED.with(|c| c.set(true));
}

/// Reads and clears the mark (called around each write transaction).
pub(crate) fn take_changed() -> bool {
    CHANGED.with(|c| c.replace(false))
}

/// One observation of the epoch; equal observations mean nothing changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    local: u64,
    file: Option<(u64, u64, i64, i64)>,
}

/// The epoch file is started afresh (by a rename) once it is this long.
const ROTATE_AT: u64 = 1 << 20;

#[derive(Debug)]
pub struct Epoch {
    path: Option<PathBuf>,
    local: AtomicU64,
    /// The epoch file as last opened. Appends from any process show in its `fstat`; once
    /// it is as long as `ROTATE_AT` it is about to be (or was) replaced by a rename, so the
    /// path is looked at again until it names a new file.
    open: std::sync::RwLock<Option<std::fs::File>>,
}

type FileStamp = (u64, u64, i64, i64);

fn file_stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

impl Epoch {
    pub fn new(path: Option<PathBuf>) -> Epoch {
        Epoch {
            path,
            local: AtomicU64::new(0),
            open: Default::default(),
        }
    }

    pub fn current(&self) -> Stamp {
        Stamp {
            local: self.local.load(Ordering::SeqCst),
            file: self.path.as_ref().and_then(|p| self.file(p)),
        }
    }

    /// The epoch file's stamp: through the open file while it is short of its rotation
    /// size, else through the path (reopening it when it names another file).
    fn file(&self, path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let held = {
            let open = self.open.read().unwrap_or_else(|p| p.into_inner());
            match open.as_ref().and_then(|f| f.metadata().ok()) {
                // Still linked (not deleted or renamed over) and short of rotation.
                Some(m) if m.nlink() > 0 && m.len() < ROTATE_AT => return Some(file_stamp(&m)),
                Some(m) => Some(m.ino()),
                None => None,
            }
        };
        let by_path = file_stamp(&std::fs::metadata(path).ok()?);
        if held == Some(by_path.0) {
            return Some(by_path); // due to rotate, not rotated yet
        }
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        let held = open
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino());
        if held != Some(by_path.0) {
            // Opened after the stat: if the file was replaced in between, the next call
            // sees a stamp that differs from this one, which is all a stamp promises.
            *open = std::fs::File::open(path).ok();
        }
        Some(by_path)
    }

    /// Records a committed change, for this process and for others on the same data dir.
    pub fn bump(&self) {
        self.local.fetch_add(1, Ordering::SeqCst);
        let Some(path) = &self.path else { return };
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(b".")?;
                f.metadata()
            });
        let result = match appended {
            // Rare: start a fresh (one-byte) file, whose new inode and mtime keep it distinct.
            Ok(m) if m.len() >= ROTATE_AT => {
                let tmp = path.with_extension(format!("epoch.{}", crate::util::random_hex(6)));
                let r = std::fs::write(&tmp, b".").and_then(|_| std::fs::rename(&tmp, path));
                if r.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                r
            }
            other => other.map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %path.display(), "could not signal a catalog change to other processes");
        }
    }
}

/// Values read from the catalog, kept while the epoch stands still and for at most `ttl`.
pub struct EpochCache<K, V> {
    map: std::sync::RwLock<std::collections::HashMap<K, (Stamp, std::time::Instant, V)>>,
    ttl: std::time::Duration,
    max: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> EpochCache<K, V> {
    pub fn new(ttl: std::time::Duration, max: usize) -> Self {
        EpochCache {
            map: Default::default(),
            ttl,
            max,
        }
    }

    /// The value for `key` if it was read at epoch `now` and is younger than the ttl.
    pub fn get(&self, key: &K, now: Stamp) -> Option<V> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let (stamp, at, v) = map.get(key)?;
        (*stamp == now && at.elapsed() < self.ttl).then(|| v.clone())
    }

    /// Keeps `value`, read after the epoch was observed as `stamp` (so a change that
    /// committed during the read leaves the entry already stale).
    pub fn put(&self, key: K, stamp: Stamp, value: V) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max {
            map.retain(|_, (s, _, _)| *s == stamp);
            if map.len() >= self.max {
                map.clear();
            }
        }
        map.insert(key, (stamp, std::time::Instant::now(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two handles on one epoch file in a fresh folder (a writer and a reader).
    fn pair() -> (tempfile::TempDir, PathBuf, Epoch, Epoch) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.epoch");
        let (a, b) = (
            Epoch::new(Some(path.clone())),
            Epoch::new(Some(path.clone())),
        );
        (dir, path, a, b)
    }

    #[test]
    fn a_bump_in_another_handle_changes_the_stamp() {
        let (_dir, _path, a, b) = pair();
        let before = a.current();
        assert_eq!(before, a.current());
        b.bump();
        let after = a.current();
        assert_ne!(before, after, "a's stamp sees b's change through the file");
        b.bump();
        assert_ne!(after, a.current());
        a.bump();
        assert_ne!(b.current(), a.current(), "the local counter differs too");
    }

    #[test]
    fn stamps_never_repeat_however_fast_the_bumps() {
        let (_dir, _path, writer, reader) = pair();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            writer.bump();
            assert!(seen.insert(reader.current()), "a stamp came back");
        }
    }

    #[test]
    fn a_reader_follows_the_file_through_rotation() {
        let (_dir, path, writer, reader) = pair();
        writer.bump();
        let held = reader.current();
        // One byte short of the rotation size: the next bump rotates the file.
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.set_len(ROTATE_AT - 1).unwrap();
        let long = reader.current();
        assert_ne!(held, long);
        writer.bump();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1, "rotated");
        let rotated = reader.current();
        assert_ne!(long, rotated, "the renamed-in file is seen");
        assert_eq!(rotated, reader.current(), "and stands still");
        writer.bump();
        let after = reader.current();
        assert_ne!(
            rotated, after,
            "a change in the new file is seen through the reopened one"
        );
        assert_eq!(after.file.unwrap().1, 2);
    }

    #[test]
    fn a_reader_follows_a_file_deleted_or_replaced() {
        let (dir, path, writer, reader) = pair();
        writer.bump();
        writer.bump();
        let held = reader.current();
        std::fs::remove_file(&path).unwrap();
        writer.bump();
        let fresh = reader.current();
        assert_ne!(held, fresh, "the new file is read, not the deleted one");
        assert_eq!(fresh.file.unwrap().1, 1);
        let other = dir.path().join("restored");
        std::fs::write(&other, b"...").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let restored = reader.current();
        assert_eq!(
            restored.file.unwrap().1,
            3,
            "a file renamed over it is read"
        );
        writer.bump();
        assert_eq!(reader.current().file.unwrap().1, 4);
    }

    #[test]
    fn cached_values_die_with_the_epoch_and_the_ttl() {
        let epoch = Epoch::new(None);
        let cache = EpochCache::new(std::time::Duration::from_secs(60), 2);
        let s0 = epoch.current();
        cache.put("a", s0, 1);
        assert_eq!(cache.get(&"a", epoch.current()), Some(1));
        epoch.bump();
        assert_eq!(cache.get(&"a", epoch.current()), None);
        let s1 = epoch.current();
        cache.put("b", s1, 2);
        cache.put("c", s1, 3);
        cache.put("d", s1, 4); // full: the stale "a" goes first, then everything
        assert_eq!(cache.get(&"d", s1), Some(4));
        let short = EpochCache::new(std::time::Duration::ZERO, 8);
        short.put("a", s1, 1);
        assert_eq!(short.get(&"a", s1), None, "a zero ttl keeps nothing");
    }

    #[test]
    fn the_mark_is_per_thread_and_taken_once() {
        assert!(!take_changed());
        catalog_changed();
        std::thread::spawn(|| assert!(!take_changed()))
            .join()
            .unwrap();
        assert!(take_changed());
        assert!(!take_changed());
    }
}
