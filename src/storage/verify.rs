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
/// from the producer, when verification or reading fails.
pub fn stream<F>(store: Store, plan: Plan, on_failure: F) -> Chunks
where
    F: FnOnce(Failure) + Send + 'static,
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
            on_failure(failure);
            let _ = tx.send(Err(io::Error::other(msg))).await;
        }
    });
    Chunks {
        rx,
        blocks_verified,
        first_block,
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
    let path = Store::path(&plan.key);
    // A file that grew or shrank is caught before the first byte, not at its end.
    match store.inner.head(&path).await {
        Ok(meta) if meta.size != plan.size => {
            return Err(Failure::WrongSize {
                expected: plan.size,
                actual: meta.size,
            });
        }
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => return Err(Failure::Missing),
        Err(e) => return Err(Failure::Unreadable(e.to_string())),
    }
    let bs = plan.block_size;
    let first = plan.range.start / bs;
    let last = (plan.range.end - 1) / bs;
    for block in first..=last {
        let start = block * bs;
        let end = ((block + 1) * bs).min(plan.size);
        let data = match store.inner.get_range(&path, start..end).await {
            Ok(d) => d,
            Err(object_store::Error::NotFound { .. }) => return Err(Failure::Missing),
            Err(e) => return Err(Failure::Unreadable(e.to_string())),
        };
        if data.len() as u64 != end - start {
            return Err(Failure::WrongSize {
                expected: plan.size,
                actual: start + data.len() as u64,
            });
        }
        let expected = plan
            .block_hashes
            .get(block as usize * HASH_LEN..(block as usize + 1) * HASH_LEN)
            .ok_or(Failure::Mismatch { block })?
            .to_vec();
        let data = verify_block(data, expected)
            .await
            .ok_or(Failure::Mismatch { block })?;
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
