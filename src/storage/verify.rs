//! The verifying reader: streams a byte range of a stored blob, reading whole blocks,
//! checking each block's BLAKE3 against the manifest before any byte of it is handed on.
//! The next block is read and hashed while the previous one drains to the client, and at
//! most a few blocks per stream are held in memory.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;

use super::Store;
use super::manifest::HASH_LEN;

/// Why a stream stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The stored object is gone.
    Missing,
    /// The stored object is not the size the manifest records.
    WrongSize { expected: u64, actual: u64 },
    /// A block's hash does not match the manifest.
    Mismatch { block: u64 },
    /// The store could not be read (not a proof of corruption).
    Unreadable(String),
}

impl Failure {
    /// Whether the failure proves the stored bytes are wrong (and the blob must be quarantined).
    pub fn is_corruption(&self) -> bool {
        !matches!(self, Failure::Unreadable(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Failure::Missing => "stored object is missing".into(),
            Failure::WrongSize { expected, actual } => {
                format!("stored object has {actual} bytes, manifest says {expected}")
            }
            Failure::Mismatch { block } => format!("block {block} does not match its BLAKE3 hash"),
            Failure::Unreadable(e) => format!("storage read failed: {e}"),
        }
    }
}

/// What to stream: the blob, its manifest and the wanted byte range.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: String,
    pub size: u64,
    pub block_size: u64,
    pub block_hashes: Vec<u8>,
    pub range: Range<u64>,
    pub chunk_size: usize,
    /// Whether verified blocks may be shared with concurrent streams of the same blob
    /// (downloads); a scrub must read the store itself and sets this to false.
    pub share: bool,
}

/// The consumer side of a verified stream.
pub struct Chunks {
    pub rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    /// How many blocks have passed verification so far.
    pub blocks_verified: Arc<AtomicU64>,
    /// Index of the first block the range touches.
    pub first_block: u64,
}

/// Starts the producer task and returns the receiving end; `on_failure` is called once,
/// from the producer, when verification or reading fails, and the future it returns (for
/// example recording a quarantine) completes before the consumer sees the error.
pub fn stream<F, Fut>(store: Store, plan: Plan, on_failure: F) -> Chunks
where
    F: FnOnce(Failure) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let blocks_verified = Arc::new(AtomicU64::new(0));
    let counter = blocks_verified.clone();
    let first_block = plan.range.start / plan.block_size;
    // Room for one block's chunks: the block in the channel drains to the socket while the
    // producer reads and hashes the next one.
    let per_block = plan.block_size.div_ceil(plan.chunk_size as u64).max(1) as usize;
    let (tx, rx) = mpsc::channel(per_block);
    tokio::spawn(async move {
        if let Err(failure) = produce(&store, &plan, &tx, &counter).await {
            let msg = failure.describe();
            // InvalidData marks proven corruption; any other kind is a read failure.
            let kind = if failure.is_corruption() {
                io::ErrorKind::InvalidData
            } else {
                io::ErrorKind::Other
            };
            on_failure(failure).await;
            let _ = tx.send(Err(io::Error::new(kind, msg))).await;
        }
    });
    Chunks {
        rx,
        blocks_verified,
        first_block,
    }
}

/// Reads blocks one after another: from a local file through one handle (opened, read and
/// hashed in one blocking call, no zero-filled buffers), or through the object store.
enum Reader {
    Local {
        path: std::path::PathBuf,
        size: u64,
        /// Opened by the first block read; `None` again only while a read holds it.
        file: Option<std::fs::File>,
        opened: bool,
    },
    Store(object_store::path::Path),
}

/// Opens a local object and checks its size: a file that grew or shrank is caught before
/// any byte is sent (see `produce`), not at its end.
fn open_local(path: &std::path::Path, size: u64) -> Result<std::fs::File, Failure> {
    match std::fs::File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.len() != size => Err(Failure::WrongSize {
                expected: size,
                actual: m.len(),
            }),
            Ok(_) => Ok(f),
            Err(e) => Err(Failure::Unreadable(e.to_string())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Failure::Missing),
        Err(e) => Err(Failure::Unreadable(e.to_string())),
    }
}

impl Reader {
    /// Opens and size-checks a local file now rather than at its first block read.
    async fn ensure_open(&mut self) -> Result<(), Failure> {
        let Reader::Local {
            path,
            size,
            file,
            opened,
        } = self
        else {
            return Ok(());
        };
        if *opened {
            return Ok(());
        }
        let (p, n) = (path.clone(), *size);
        let f = tokio::task::spawn_blocking(move || open_local(&p, n))
            .await
            .map_err(|e| Failure::Unreadable(e.to_string()))??;
        *file = Some(f);
        *opened = true;
        Ok(())
    }

    /// Prepares to read the object; an object store's object is checked for its size here,
    /// a local file when the first block is read.
    async fn open(store: &Store, plan: &Plan) -> Result<Reader, Failure> {
        if let Some(root) = &store.local_root {
            return Ok(Reader::Local {
                path: root.join(&plan.key),
                size: plan.size,
                file: None,
                opened: false,
            });
        }
        let path = Store::path(&plan.key);
        match store.inner.head(&path).await {
            Ok(meta) if meta.size != plan.size => Err(Failure::WrongSize {
                expected: plan.size,
                actual: meta.size,
            }),
            Ok(_) => Ok(Reader::Store(path)),
            Err(object_store::Error::NotFound { .. }) => Err(Failure::Missing),
            Err(e) => Err(Failure::Unreadable(e.to_string())),
        }
    }

    /// Reads `start..end` and returns it only if its BLAKE3 is `expected`.
    async fn verified_block(
        &mut self,
        store: &Store,
        start: u64,
        end: u64,
        block: u64,
        expected: Vec<u8>,
    ) -> Result<Bytes, Failure> {
        let len = end - start;
        match self {
            Reader::Local {
                path,
                size,
                file: slot,
                opened,
            } => {
                let held = slot.take();
                if held.is_none() && *opened {
                    return Err(Failure::Unreadable("reader closed".into()));
                }
                *opened = true;
                let (path, size) = (path.clone(), *size);
                let (file, result) = tokio::task::spawn_blocking(move || {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut file = match held {
                        Some(f) => f,
                        None => match open_local(&path, size) {
                            Ok(f) => f,
                            Err(e) => return (None, Err(e)),
                        },
                    };
                    let mut buf = Vec::with_capacity(len as usize);
                    let read = file
                        .seek(SeekFrom::Start(start))
                        .and_then(|_| (&mut file).take(len).read_to_end(&mut buf));
                    let result = match read {
                        Ok(n) if n as u64 != len => Err(Failure::WrongSize {
                            expected: len,
                            actual: start + n as u64,
                        }),
                        Ok(_) if blake3::hash(&buf).as_bytes()[..] == expected[..] => {
                            Ok(Bytes::from(buf))
                        }
                        Ok(_) => Err(Failure::Mismatch { block }),
                        Err(e) => Err(Failure::Unreadable(e.to_string())),
                    };
                    (Some(file), result)
                })
                .await
                .map_err(|e| Failure::Unreadable(e.to_string()))?;
                *slot = file;
                result
            }
            Reader::Store(path) => {
                let data = match store.inner.get_range(path, start..end).await {
                    Ok(d) => d,
                    Err(object_store::Error::NotFound { .. }) => return Err(Failure::Missing),
                    Err(e) => return Err(Failure::Unreadable(e.to_string())),
                };
                if data.len() as u64 != len {
                    return Err(Failure::WrongSize {
                        expected: len,
                        actual: start + data.len() as u64,
                    });
                }
                verify_block(data, expected)
                    .await
                    .ok_or(Failure::Mismatch { block })
            }
        }
    }
}

async fn produce(
    store: &Store,
    plan: &Plan,
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
    verified: &AtomicU64,
) -> Result<(), Failure> {
    if plan.range.is_empty() {
        return Ok(());
    }
    let mut reader = Reader::open(store, plan).await?;
    let bs = plan.block_size;
    let first = plan.range.start / bs;
    let last = (plan.range.end - 1) / bs;
    if first != last {
        // Blocks may come from other streams; check the object itself before the headers go
        // out, so a missing or resized file is a clean error, not a cut-off body. (A one-block
        // range opens it in its only read, or is served bytes another stream just verified.)
        reader.ensure_open().await?;
    }
    for block in first..=last {
        let start = block * bs;
        let end = ((block + 1) * bs).min(plan.size);
        let expected = plan
            .block_hashes
            .get(block as usize * HASH_LEN..(block as usize + 1) * HASH_LEN)
            .ok_or(Failure::Mismatch { block })?
            .to_vec();
        let data = if plan.share {
            let read = reader.verified_block(store, start, end, block, expected.clone());
            store
                .blocks
                .get_or_fill(&plan.key, start, end, &expected, read)
                .await?
        } else {
            reader
                .verified_block(store, start, end, block, expected)
                .await?
        };
        verified.fetch_add(1, Ordering::Relaxed);
        // Hand on only the wanted part of the verified block, in socket-sized pieces.
        let from = plan.range.start.max(start) - start;
        let to = plan.range.end.min(end) - start;
        let mut at = from as usize;
        while at < to as usize {
            let next = (at + plan.chunk_size).min(to as usize);
            if tx.send(Ok(data.slice(at..next))).await.is_err() {
                return Ok(()); // the client went away
            }
            at = next;
        }
    }
    Ok(())
}

/// Hashes off the async thread; returns the block back when it matches.
async fn verify_block(data: Bytes, expected: Vec<u8>) -> Option<Bytes> {
    tokio::task::spawn_blocking(move || {
        let ok = blake3::hash(&data).as_bytes()[..] == expected[..];
        ok.then_some(data)
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::storage::manifest::Hasher;

    const BS: u64 = 64 * 1024;

    async fn blob(data: &[u8]) -> (Store, Plan) {
        let store = Store {
            local_root: None,
            upstream: None,
            inner: Arc::new(InMemory::new()),
            blocks: Default::default(),
        };
        store
            .inner
            .put(&Store::path("b"), data.to_vec().into())
            .await
            .unwrap();
        let mut h = Hasher::new(BS);
        h.update(data);
        let d = h.finish();
        let plan = Plan {
            key: "b".into(),
            size: d.size,
            block_size: BS,
            block_hashes: d.block_hashes,
            range: 0..d.size,
            chunk_size: 16 * 1024,
            share: true,
        };
        (store, plan)
    }

    /// Lets the producer run as far ahead as it can before the next observation.
    async fn let_producer_run() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
            let _ = tokio::task::spawn_blocking(|| ()).await;
        }
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_producer_at_most_three_blocks_ahead() {
        let data: Vec<u8> = (0..40 * BS).map(|i| (i % 251) as u8).collect();
        let (store, plan) = blob(&data).await;
        let mut chunks = stream(store, plan, |f| -> std::future::Ready<()> {
            panic!("unexpected failure {f:?}")
        });
        let mut received = 0u64;
        let mut max_lead = 0;
        loop {
            let_producer_run().await;
            let verified = chunks.blocks_verified.load(Ordering::Relaxed);
            let consumed = received / BS;
            max_lead = max_lead.max(verified - consumed);
            assert!(
                verified <= consumed + 3,
                "producer ran {verified} blocks ahead of {consumed}"
            );
            match chunks.rx.recv().await {
                Some(Ok(b)) => {
                    assert_eq!(
                        &b[..],
                        &data[received as usize..received as usize + b.len()]
                    );
                    received += b.len() as u64;
                }
                Some(Err(e)) => panic!("{e}"),
                None => break,
            }
        }
        assert_eq!(received, data.len() as u64);
        assert!(max_lead >= 1, "the producer does read ahead (pipelining)");
    }

    #[tokio::test]
    async fn a_range_verifies_only_the_blocks_it_touches() {
        let data: Vec<u8> = (0..10 * BS).map(|i| (i % 13) as u8).collect();
        let (store, mut plan) = blob(&data).await;
        plan.range = 3 * BS - 1..5 * BS + 1; // blocks 2..=5
        let mut chunks = stream(store, plan, |f| -> std::future::Ready<()> {
            panic!("unexpected failure {f:?}")
        });
        let mut got = Vec::new();
        while let Some(piece) = chunks.rx.recv().await {
            got.extend_from_slice(&piece.unwrap());
        }
        assert_eq!(
            &got[..],
            &data[(3 * BS - 1) as usize..(5 * BS + 1) as usize]
        );
        assert_eq!(chunks.first_block, 2);
        assert_eq!(chunks.blocks_verified.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_bad_block_stops_the_stream_before_any_of_its_bytes() {
        let data: Vec<u8> = (0..4 * BS).map(|i| (i % 7) as u8).collect();
        let (store, plan) = blob(&data).await;
        let mut bad = data.clone();
        bad[(2 * BS + 5) as usize] ^= 1;
        store
            .inner
            .put(&Store::path("b"), bad.into())
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut chunks = stream(store, plan, move |f| {
            let _ = tx.send(f);
            std::future::ready(())
        });
        let mut got = Vec::new();
        let mut failed = false;
        while let Some(piece) = chunks.rx.recv().await {
            match piece {
                Ok(b) => got.extend_from_slice(&b),
                Err(_) => failed = true,
            }
        }
        assert!(failed);
        assert_eq!(got.len() as u64, 2 * BS);
        assert_eq!(&got[..], &data[..got.len()]);
        assert_eq!(rx.await.unwrap(), Failure::Mismatch { block: 2 });
    }
}
