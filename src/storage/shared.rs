//! Verified blocks shared between concurrent streams of the same blob.
//!
//! When several clients download the same file at once, each block is read and hashed
//! once: the first stream to need it reads and verifies it, streams that ask meanwhile
//! wait for that result, and later streams reuse the verified bytes for as long as any
//! stream still holds them. Nothing is kept once the last stream lets a block go, so a
//! block that rots on disk afterwards is read and caught again by the next request.
//! Every byte sent has still passed its block's BLAKE3 check; only the work is shared.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::watch;

/// Entries beyond this count trigger a sweep of the dead ones.
const SWEEP_AT: usize = 1024;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    object: String,
    start: u64,
    end: u64,
    hash: Vec<u8>,
}

enum Slot {
    /// A stream is reading and verifying the block; the sender side lives with it.
    Filling(watch::Receiver<()>),
    /// Verified bytes, alive while some stream holds a piece of them.
    Ready(Weak<Bytes>),
}

/// Keeps an `Arc<Bytes>` alive for as long as any slice handed out from it lives.
struct Held(Arc<Bytes>);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

#[derive(Default)]
pub struct Blocks {
    slots: Mutex<HashMap<Key, Slot>>,
    /// Bytes a stream read and verified itself.
    read: AtomicU64,
    /// Bytes a stream took from another stream's verified read.
    shared: AtomicU64,
}

enum Next {
    Hit(Arc<Bytes>),
    Wait(watch::Receiver<()>),
    Fill(watch::Sender<()>),
}

/// Removes a claim that ended without a result, so that waiting streams retry.
struct Claim<'a> {
    blocks: &'a Blocks,
    key: &'a Key,
    done: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.blocks.lock().remove(self.key);
        }
    }
}

impl Blocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the verified bytes of `start..end` of `object`, whose BLAKE3 is `hash`:
    /// shared with another stream when one holds them, otherwise from `fill`, which must
    /// return only bytes it has verified. `fill` is polled only when this stream reads.
    pub async fn get_or_fill<E>(
        &self,
        object: &str,
        start: u64,
        end: u64,
        hash: &[u8],
        fill: impl Future<Output = Result<Bytes, E>>,
    ) -> Result<Bytes, E> {
        let key = Key {
            object: object.to_owned(),
            start,
            end,
            hash: hash.to_vec(),
        };
        let tx = loop {
            let next = {
                let mut slots = self.lock();
                let next = match slots.get(&key) {
                    Some(Slot::Ready(w)) => w.upgrade().map(Next::Hit),
                    // A claim whose sender is gone failed or was abandoned: take it over.
                    Some(Slot::Filling(rx)) if rx.has_changed().is_ok() => {
                        Some(Next::Wait(rx.clone()))
                    }
                    _ => None,
                };
                next.unwrap_or_else(|| {
                    let (tx, rx) = watch::channel(());
                    slots.insert(key.clone(), Slot::Filling(rx));
                    Next::Fill(tx)
                })
            };
            match next {
                Next::Hit(bytes) => {
                    self.shared.fetch_add(end - start, Ordering::Relaxed);
                    return Ok(Bytes::from_owner(Held(bytes)));
                }
                // Woken by a result or by the filler giving up; either way, look again.
                Next::Wait(mut rx) => {
                    let _ = rx.changed().await;
                }
                Next::Fill(tx) => break tx,
            }
        };
        let mut claim = Claim {
            blocks: self,
            key: &key,
            done: false,
        };
        let bytes = Arc::new(fill.await?);
        self.read.fetch_add(end - start, Ordering::Relaxed);
        {
            let mut slots = self.lock();
            if slots.len() >= SWEEP_AT {
                slots.retain(|_, s| match s {
                    Slot::Ready(w) => w.strong_count() > 0,
                    Slot::Filling(rx) => rx.has_changed().is_ok(),
                });
            }
            slots.insert(key.clone(), Slot::Ready(Arc::downgrade(&bytes)));
        }
        claim.done = true;
        let _ = tx.send(());
        Ok(Bytes::from_owner(Held(bytes)))
    }

    /// Bytes read and verified by streams themselves, and bytes they shared, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.shared.load(Ordering::Relaxed),
        )
    }

    /// How many blocks are held by some stream right now.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, Slot::Ready(w) if w.strong_count() > 0))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    async fn counted(reads: &AtomicUsize, data: &'static [u8]) -> Result<Bytes, ()> {
        reads.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        Ok(Bytes::from_static(data))
    }

    #[tokio::test]
    async fn concurrent_streams_read_a_block_once_and_get_the_same_bytes() {
        let blocks = Arc::new(Blocks::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (blocks, reads) = (blocks.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                blocks
                    .get_or_fill("o", 0, 5, b"h", counted(&reads, b"hello"))
                    .await
            }));
        }
        let mut held = Vec::new();
        for t in tasks {
            let b = t.await.unwrap().unwrap();
            assert_eq!(&b[..], b"hello");
            held.push(b);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(blocks.live(), 1);
        // One stream read the five bytes; the other fifteen shared them.
        assert_eq!(blocks.counts(), (5, 15 * 5));
        // A slice alone keeps the block shared.
        let piece = held[3].slice(1..3);
        drop(held);
        let again = blocks
            .get_or_fill("o", 0, 5, b"h", counted(&reads, b"hello"))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        drop((piece, again));
        // Once nobody holds it, the next stream reads the store again.
        assert_eq!(blocks.live(), 0);
        blocks
            .get_or_fill("o", 0, 5, b"h", counted(&reads, b"hello"))
            .await
            .unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_different_expected_hash_or_range_is_never_shared() {
        let blocks = Blocks::default();
        let reads = AtomicUsize::new(0);
        let a = blocks
            .get_or_fill("o", 0, 5, b"h1", counted(&reads, b"aaaaa"))
            .await
            .unwrap();
        let b = blocks
            .get_or_fill("o", 0, 5, b"h2", counted(&reads, b"bbbbb"))
            .await
            .unwrap();
        let c = blocks
            .get_or_fill("o", 5, 10, b"h1", counted(&reads, b"ccccc"))
            .await
            .unwrap();
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"aaaaa"[..], &b"bbbbb"[..], &b"ccccc"[..])
        );
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_fill_is_not_shared_and_waiters_read_for_themselves() {
        let blocks = Arc::new(Blocks::default());
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let blocks = blocks.clone();
            tokio::spawn(async move {
                blocks
                    .get_or_fill("o", 0, 5, b"h", async move {
                        let _ = gate.await;
                        Err::<Bytes, &str>("mismatch")
                    })
                    .await
            })
        };
        // Wait until the first stream holds the claim.
        while blocks.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let blocks = blocks.clone();
            tokio::spawn(async move {
                blocks
                    .get_or_fill("o", 0, 5, b"h", async {
                        Ok::<_, &str>(Bytes::from_static(b"hello"))
                    })
                    .await
            })
        };
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Err("mismatch"));
        assert_eq!(&second.await.unwrap().unwrap()[..], b"hello");
    }
}
