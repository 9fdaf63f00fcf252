//! The verifying reader: streams a byte range of a stored blob, checking every byte against
//! the block manifest before it is handed on.
//!
//! Blocks recorded with piece CVs (`manifest::PIECE_SIZE`) are read in units of whole pieces:
//! the block's CVs are first merged and compared with the manifest's block hash, then each
//! piece is hashed as its subtree and compared with its CV, so every byte sent is proven to
//! belong to the block the manifest names. A unit is up to `chunk_size` while few streams run
//! and shrinks towards one piece as more do, keeping all streams' buffers near
//! `BUFFER_BUDGET`. Blocks without CVs are read and verified whole. Either way the next unit
//! is read and hashed while the previous one drains to the client. From an object store,
//! where every read is a request with its own round trip, several units are read at once
//! (see `read_ahead`).

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;

use super::Store;
use super::manifest::{self, HASH_LEN, PIECE_SIZE};

/// What the streams' buffers may hold together when every stream reads pieces: a unit read
/// ahead, one queued and actix's copy of the one being written, for each stream.
pub const BUFFER_BUDGET: u64 = 24 << 20;

/// Verified streams running now (their producers).
static STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a producer while it runs.
struct Running;

impl Running {
    fn start() -> Running {
        STREAMS.fetch_add(1, Ordering::Relaxed);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many pieces the next read takes: as many as `chunk_size` holds when the budget
/// allows, one when many streams share it.
fn unit_pieces(chunk_size: usize) -> u64 {
    pieces_for(STREAMS.load(Ordering::Relaxed), chunk_size)
}

fn pieces_for(active: usize, chunk_size: usize) -> u64 {
    let active = active.max(1) as u64;
    let most = (chunk_size as u64 / PIECE_SIZE).max(1);
    (BUFFER_BUDGET / (3 * PIECE_SIZE * active)).clamp(1, most)
}

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
    /// Packed piece CVs; empty when the blob has none (blocks are then verified whole).
    pub piece_hashes: Bytes,
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
    if let Some(bytes) = read_small(&store, &plan) {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(bytes));
        blocks_verified.store(1, Ordering::Relaxed);
        return Chunks {
            rx,
            blocks_verified,
            first_block,
        };
    }
    // Pieces: one unit queued while the next is read. Whole blocks: room for one block's
    // chunks, draining to the socket while the producer reads and hashes the next block.
    let queue = if plan.has_pieces() {
        1
    } else {
        plan.block_size.div_ceil(plan.chunk_size as u64).max(1) as usize
    };
    let (tx, rx) = mpsc::channel(queue);
    tokio::spawn(async move {
        let _running = Running::start();
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

/// Piece CVs by content and block size, kept for the streams that need them within
/// `PIECE_CACHE_BYTES`. An entry never goes stale: the same content cut into the same
/// blocks has the same CVs (and CVs that do not merge into the block hash are not used).
#[derive(Default)]
pub struct PieceCache {
    /// The CVs by (SHA-256, block size).
    entries: std::sync::Mutex<crate::storage::budget::Budgeted<(String, u64), Bytes>>,
}

/// What `PieceCache` holds at most: the CVs of 64 GiB of files.
pub const PIECE_CACHE_BYTES: usize = 16 << 20;

impl PieceCache {
    pub fn get(&self, sha256: &str, block_size: u64) -> Option<Bytes> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(&(sha256.to_owned(), block_size)).cloned()
    }

    /// Keeps `cvs` unless it alone exceeds the budget; makes room by dropping other entries.
    pub fn put(&self, sha256: &str, block_size: u64, cvs: Bytes) {
        if cvs.len() > PIECE_CACHE_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.make_room(cvs.len(), PIECE_CACHE_BYTES);
        entries.insert((sha256.to_owned(), block_size), cvs);
    }
}

/// Local objects up to this size are read and verified on the calling thread: the read is a
/// few microseconds from the page cache, less than handing it to a blocking thread and back.
pub const INLINE_MAX: u64 = 64 << 10;

/// Reads a small local object whole and returns the wanted range if its one block verifies;
/// `None` when the plan does not qualify or anything is off, so that the streaming path
/// (which reports failures) handles it. A copy kept in `store.small`, verified when it was
/// read, saves the open, read, hash and close while the file is unchanged (see
/// `storage::small`).
fn read_small(store: &Store, plan: &Plan) -> Option<Bytes> {
    use std::io::Read;
    let root = store.local_root.as_ref()?;
    if plan.size > INLINE_MAX || plan.size > plan.block_size || plan.range.is_empty() {
        return None;
    }
    let hash: [u8; HASH_LEN] = plan.block_hashes.get(..HASH_LEN)?.try_into().ok()?;
    let size = plan.size as usize;
    let slice = |b: Bytes| b.slice(plan.range.start as usize..plan.range.end as usize);
    // A scrub (share = false) always reads the disk.
    let cache = plan.share.then_some(&*store.small);
    if let Some(bytes) = cache.and_then(|c| c.get(&plan.key, &hash))
        && bytes.len() == size
    {
        return Some(slice(bytes));
    }
    // The size is not taken from a stat: up to one byte more than expected is read instead,
    // and a file of any other length (a regular file reads short only at its end) goes the
    // streaming way, which reports it.
    let mut file = std::fs::File::open(root.join(&plan.key)).ok()?;
    let mut buf = vec![0u8; size + 1];
    let mut n = 0;
    while n < size {
        match file.read(&mut buf[n..]).ok()? {
            0 => return None,
            k => n += k,
        }
    }
    buf.truncate(size);
    if n != size || !Check::Block(hash).passes(&buf) {
        return None;
    }
    let bytes = Bytes::from(buf);
    if let Some(c) = cache {
        c.put(&plan.key, file, &hash, &bytes);
    }
    Some(slice(bytes))
}

impl Plan {
    /// Whether the blob's piece CVs are recorded and fit its size and block size.
    fn has_pieces(&self) -> bool {
        manifest::pieces_apply(self.block_size)
            && self.piece_hashes.len() as u64 == self.size.div_ceil(PIECE_SIZE) * HASH_LEN as u64
    }
}

/// What a read must match before its bytes are handed on.
#[derive(Clone)]
enum Check {
    /// A whole block against its BLAKE3 hash.
    Block([u8; HASH_LEN]),
    /// Whole pieces, the first `offset` bytes into its block, against their CVs.
    Pieces { offset: u64, cvs: Bytes },
}

impl Check {
    fn passes(&self, data: &[u8]) -> bool {
        match self {
            Check::Block(hash) => blake3::hash(data).as_bytes() == hash,
            Check::Pieces { offset, cvs } => {
                let mut at = *offset;
                data.chunks(PIECE_SIZE as usize)
                    .zip(cvs.chunks(HASH_LEN))
                    .all(|(piece, cv)| {
                        let ok = manifest::piece_cv(at, piece)[..] == cv[..];
                        at += PIECE_SIZE;
                        ok
                    })
                    && cvs.len() == data.len().div_ceil(PIECE_SIZE as usize) * HASH_LEN
            }
        }
    }
}

/// Where a stream's blocks come from: a local file, read one unit after another through one
/// handle, or an object store, read ahead (see `read_ahead`).
enum Source {
    Local(LocalReader),
    Store(object_store::path::Path),
}

/// A local file read through one handle (opened, read and hashed in one blocking call, no
/// zero-filled buffers).
struct LocalReader {
    path: std::path::PathBuf,
    size: u64,
    /// Opened by the first block read; `None` again only while a read holds it.
    file: Option<std::fs::File>,
    opened: bool,
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

impl Source {
    /// Prepares to read the object; an object store's object is checked for its size here,
    /// a local file when the first block is read.
    async fn open(store: &Store, plan: &Plan) -> Result<Source, Failure> {
        if let Some(root) = &store.local_root {
            return Ok(Source::Local(LocalReader {
                path: root.join(&plan.key),
                size: plan.size,
                file: None,
                opened: false,
            }));
        }
        let path = Store::path(&plan.key);
        match store.inner.head(&path).await {
            Ok(meta) if meta.size != plan.size => Err(Failure::WrongSize {
                expected: plan.size,
                actual: meta.size,
            }),
            Ok(_) => Ok(Source::Store(path)),
            Err(object_store::Error::NotFound { .. }) => Err(Failure::Missing),
            Err(e) => Err(Failure::Unreadable(e.to_string())),
        }
    }
}

impl LocalReader {
    /// Opens and size-checks the file now rather than at its first block read.
    async fn ensure_open(&mut self) -> Result<(), Failure> {
        if self.opened {
            return Ok(());
        }
        let (p, n) = (self.path.clone(), self.size);
        let f = tokio::task::spawn_blocking(move || open_local(&p, n))
            .await
            .map_err(|e| Failure::Unreadable(e.to_string()))??;
        self.file = Some(f);
        self.opened = true;
        Ok(())
    }

    /// Reads `span` (in block `block`) and returns it only if it passes `check`.
    async fn verified(
        &mut self,
        span: Range<u64>,
        block: u64,
        check: Check,
    ) -> Result<Bytes, Failure> {
        let (start, len) = (span.start, span.end - span.start);
        let held = self.file.take();
        if held.is_none() && self.opened {
            return Err(Failure::Unreadable("reader closed".into()));
        }
        self.opened = true;
        let (path, size) = (self.path.clone(), self.size);
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
                Ok(_) if check.passes(&buf) => Ok(Bytes::from(buf)),
                Ok(_) => Err(Failure::Mismatch { block }),
                Err(e) => Err(Failure::Unreadable(e.to_string())),
            };
            (Some(file), result)
        })
        .await
        .map_err(|e| Failure::Unreadable(e.to_string()))?;
        self.file = file;
        result
    }
}

/// Reads `span` (in block `block`) from the object store and returns it only if it passes
/// `check`.
async fn read_store(
    store: &Store,
    path: &object_store::path::Path,
    span: Range<u64>,
    block: u64,
    check: Check,
) -> Result<Bytes, Failure> {
    let len = span.end - span.start;
    let start = span.start;
    let data = match store.inner.get_range(path, span).await {
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
    verify_off_thread(data, check)
        .await
        .ok_or(Failure::Mismatch { block })
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
    let units = Units::new(plan);
    let mut reader = match Source::open(store, plan).await? {
        Source::Store(path) => return read_ahead(store, plan, &path, units, tx, verified).await,
        Source::Local(reader) => reader,
    };
    if units.next_block != units.last_block {
        // Blocks may come from other streams; check the file itself before the headers go
        // out, so a missing or resized file is a clean error, not a cut-off body. (A one-block
        // range opens it in its only read, or is served bytes another stream just verified.)
        reader.ensure_open().await?;
    }
    let key = plan.share.then_some(plan.key.as_str());
    for unit in units {
        let Unit {
            span,
            block,
            hash,
            check,
            wanted,
            ends_block,
        } = unit?;
        let read = reader.verified(span.clone(), block, check);
        let data = shared_or_read(store, key, &span, &hash, read).await?;
        verified.fetch_add(u64::from(ends_block), Ordering::Relaxed);
        if !hand_on(tx, &data, span.start, wanted, plan.chunk_size).await {
            return Ok(()); // the client went away
        }
    }
    Ok(())
}

/// One read of a stream: a span of one block, what it must pass, and the part of it the
/// client wants.
struct Unit {
    span: Range<u64>,
    block: u64,
    hash: [u8; HASH_LEN],
    check: Check,
    wanted: Range<u64>,
    /// The last read of its block, which then counts as verified.
    ends_block: bool,
}

/// The reads that cover a plan's range, in order. Blocks whose piece CVs merge into the
/// manifest's block hash are read in units of whole pieces, sized as each is reached (so
/// they shrink as streams add up); any other block (CVs damaged or absent, a one-piece last
/// block) is read and verified whole.
struct Units<'a> {
    plan: &'a Plan,
    pieces: bool,
    next_block: u64,
    last_block: u64,
    /// The block being read in pieces, and where its next unit starts.
    within: Option<(PieceBlock, u64)>,
}

struct PieceBlock {
    index: u64,
    start: u64,
    end: u64,
    hash: [u8; HASH_LEN],
    cvs: Bytes,
    wanted: Range<u64>,
}

impl<'a> Units<'a> {
    fn new(plan: &'a Plan) -> Units<'a> {
        Units {
            plan,
            pieces: plan.has_pieces(),
            next_block: plan.range.start / plan.block_size,
            last_block: (plan.range.end - 1) / plan.block_size,
            within: None,
        }
    }

    fn next_piece_unit(&mut self) -> Option<Unit> {
        let (b, at) = self.within.as_mut()?;
        // Units are aligned to their size within the block, so concurrent streams in the
        // same state read (and share) the same units.
        let unit = unit_pieces(self.plan.chunk_size) * PIECE_SIZE;
        let unit_end = (b.start + ((*at - b.start) / unit + 1) * unit)
            .min(b.wanted.end.div_ceil(PIECE_SIZE) * PIECE_SIZE)
            .min(b.end);
        let first_cv = ((*at - b.start) / PIECE_SIZE) as usize * HASH_LEN;
        let last_cv = (unit_end - b.start).div_ceil(PIECE_SIZE) as usize * HASH_LEN;
        let out = Unit {
            span: *at..unit_end,
            block: b.index,
            hash: b.hash,
            check: Check::Pieces {
                offset: *at - b.start,
                cvs: b.cvs.slice(first_cv..last_cv),
            },
            wanted: b.wanted.clone(),
            ends_block: unit_end >= b.wanted.end,
        };
        *at = unit_end;
        if out.ends_block {
            self.within = None;
        }
        Some(out)
    }
}

impl Iterator for Units<'_> {
    type Item = Result<Unit, Failure>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(unit) = self.next_piece_unit() {
            return Some(Ok(unit));
        }
        if self.next_block > self.last_block {
            return None;
        }
        let (plan, block) = (self.plan, self.next_block);
        self.next_block += 1;
        let bs = plan.block_size;
        let (start, end) = (block * bs, ((block + 1) * bs).min(plan.size));
        let Some(hash) = plan
            .block_hashes
            .get(block as usize * HASH_LEN..(block as usize + 1) * HASH_LEN)
            .and_then(|h| <[u8; HASH_LEN]>::try_from(h).ok())
        else {
            self.next_block = self.last_block + 1; // nothing after a failure
            return Some(Err(Failure::Mismatch { block }));
        };
        // The wanted part of this block.
        let wanted = plan.range.start.max(start)..plan.range.end.min(end);
        // (`has_pieces` checked that the CVs cover the blob, so the slice is in bounds.)
        let cvs = self.pieces.then(|| {
            plan.piece_hashes.slice(
                (start / PIECE_SIZE) as usize * HASH_LEN
                    ..end.div_ceil(PIECE_SIZE) as usize * HASH_LEN,
            )
        });
        if let Some(cvs) = cvs.filter(|cvs| manifest::block_root(cvs, end - start) == Some(hash)) {
            let at = wanted.start / PIECE_SIZE * PIECE_SIZE;
            let b = PieceBlock {
                index: block,
                start,
                end,
                hash,
                cvs,
                wanted,
            };
            self.within = Some((b, at));
            return self.next_piece_unit().map(Ok);
        }
        Some(Ok(Unit {
            span: start..end,
            block,
            hash,
            check: Check::Block(hash),
            wanted,
            ends_block: true,
        }))
    }
}

/// At most this much of one stream is being read ahead from an object store at a time.
const STORE_AHEAD_MAX: u64 = 8 << 20;

/// The object-store side of [`produce`]: each read is a request with a round trip of its own
/// (milliseconds on S3), so several run at once and are handed on in order. They are bounded
/// by `STORE_AHEAD_MAX` and by half the stream's share of `BUFFER_BUDGET` (the other half
/// covers the unit queued and the one being written), always allowing one.
///
/// Each read runs as a task of its own: it may hold the claim on a unit that other streams of
/// the same blob wait for (see `shared::Blocks`), so it must finish even while this stream
/// waits for a slow client to take the previous unit.
async fn read_ahead(
    store: &Store,
    plan: &Plan,
    path: &object_store::path::Path,
    units: Units<'_>,
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
    verified: &AtomicU64,
) -> Result<(), Failure> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesOrdered;
    let read = |unit: Result<Unit, Failure>| {
        let (store, path) = (store.clone(), path.clone());
        let shared = plan.share.then(|| plan.key.clone());
        let task = tokio::spawn(async move {
            let unit = unit?;
            let read = read_store(
                &store,
                &path,
                unit.span.clone(),
                unit.block,
                unit.check.clone(),
            );
            let data =
                shared_or_read(&store, shared.as_deref(), &unit.span, &unit.hash, read).await?;
            Ok::<_, Failure>((unit, data))
        });
        async move {
            task.await
                .map_err(|e| Failure::Unreadable(format!("read task: {e}")))?
        }
    };
    let mut units = units.peekable();
    let mut reading = FuturesOrdered::new();
    let mut in_flight = 0u64;
    loop {
        let share = BUFFER_BUDGET / (2 * STREAMS.load(Ordering::Relaxed).max(1) as u64);
        let budget = share.min(STORE_AHEAD_MAX);
        while let Some(next) = units.peek() {
            let len = next.as_ref().map_or(0, |u| u.span.end - u.span.start);
            if !reading.is_empty() && in_flight + len > budget {
                break;
            }
            let Some(unit) = units.next() else { break };
            in_flight += len;
            reading.push_back(read(unit));
        }
        let Some(done) = reading.next().await else {
            return Ok(());
        };
        let (unit, data) = done?;
        in_flight -= unit.span.end - unit.span.start;
        verified.fetch_add(u64::from(unit.ends_block), Ordering::Relaxed);
        if !hand_on(tx, &data, unit.span.start, unit.wanted, plan.chunk_size).await {
            return Ok(()); // the client went away (reads under way finish on their own)
        }
    }
}

/// The verified bytes of `span` of a block whose hash is `hash`: when `key` names the blob
/// (downloads), shared with concurrent streams of it under the block hash, which fixes every
/// byte of the block and so of any part of it; otherwise (a scrub) from `read` alone.
async fn shared_or_read(
    store: &Store,
    key: Option<&str>,
    span: &Range<u64>,
    hash: &[u8; HASH_LEN],
    read: impl std::future::Future<Output = Result<Bytes, Failure>>,
) -> Result<Bytes, Failure> {
    match key {
        Some(key) => {
            store
                .blocks
                .get_or_fill(key, span.start, span.end, hash, read)
                .await
        }
        None => read.await,
    }
}

/// Sends the part of verified `data` (which starts at `at` in the object) that falls in
/// `wanted`, in pieces of at most `chunk_size`; false once the client has gone.
async fn hand_on(
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
    data: &Bytes,
    at: u64,
    wanted: Range<u64>,
    chunk_size: usize,
) -> bool {
    let end = (wanted.end.min(at + data.len() as u64) - at) as usize;
    let mut from = (wanted.start.max(at) - at) as usize;
    while from < end {
        let to = (from + chunk_size).min(end);
        if tx.send(Ok(data.slice(from..to))).await.is_err() {
            return false;
        }
        from = to;
    }
    true
}

/// Hashes off the async thread; returns the bytes back when they pass.
async fn verify_off_thread(data: Bytes, check: Check) -> Option<Bytes> {
    tokio::task::spawn_blocking(move || check.passes(&data).then_some(data))
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
        blob_with(data, BS).await
    }

    async fn blob_with(data: &[u8], block_size: u64) -> (Store, Plan) {
        let store = Store {
            local_root: None,
            upstream: None,
            inner: Arc::new(InMemory::new()),
            blocks: Default::default(),
            small: Default::default(),
        };
        store
            .inner
            .put(&Store::path("b"), data.to_vec().into())
            .await
            .unwrap();
        let mut h = Hasher::new(block_size);
        h.update(data);
        let d = h.finish();
        let plan = Plan {
            key: "b".into(),
            size: d.size,
            block_size,
            block_hashes: d.block_hashes,
            piece_hashes: d.piece_hashes.into(),
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
        let (on_failure, seen) = capture();
        let (got, failed) = drain(stream(store, plan, on_failure)).await;
        assert!(failed);
        assert_eq!(got.len() as u64, 2 * BS);
        assert_eq!(&got[..], &data[..got.len()]);
        assert_eq!(seen.await.unwrap(), Failure::Mismatch { block: 2 });
    }

    const P: u64 = PIECE_SIZE;

    /// Drains a stream; returns the bytes received and whether it ended in an error.
    async fn drain(mut chunks: Chunks) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        while let Some(piece) = chunks.rx.recv().await {
            match piece {
                Ok(b) => got.extend_from_slice(&b),
                Err(_) => return (got, true),
            }
        }
        (got, false)
    }

    fn no_failure(f: Failure) -> std::future::Ready<()> {
        panic!("unexpected failure {f:?}")
    }

    /// A failure callback that hands the failure to the returned receiver.
    fn capture() -> (
        impl FnOnce(Failure) -> std::future::Ready<()>,
        tokio::sync::oneshot::Receiver<Failure>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let on_failure = move |f| {
            let _ = tx.send(f);
            std::future::ready(())
        };
        (on_failure, rx)
    }

    #[tokio::test]
    async fn pieces_serve_any_range_of_a_blob() {
        let data: Vec<u8> = (0..13 * P + 999).map(|i| (i * 17 % 251) as u8).collect();
        let (store, plan) = blob_with(&data, 4 * P).await;
        assert!(plan.has_pieces());
        let n = data.len() as u64;
        for range in [
            0..n,
            1..n - 1,
            P - 1..P + 1,
            4 * P - 3..9 * P + 5,
            n - 10..n,
            5..6,
        ] {
            for chunk_size in [P as usize, 1 << 20] {
                let mut plan = plan.clone();
                plan.range = range.clone();
                plan.chunk_size = chunk_size;
                let (got, failed) = drain(stream(store.clone(), plan, no_failure)).await;
                assert!(!failed);
                assert_eq!(
                    got,
                    &data[range.start as usize..range.end as usize],
                    "{range:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_bad_piece_stops_the_stream_before_any_of_its_bytes() {
        let data: Vec<u8> = (0..12 * P).map(|i| (i % 249) as u8).collect();
        let (store, mut plan) = blob_with(&data, 4 * P).await;
        plan.chunk_size = P as usize; // one piece per read
        let mut bad = data.clone();
        bad[(6 * P + 77) as usize] ^= 0x40; // block 1, its third piece
        store
            .inner
            .put(&Store::path("b"), bad.into())
            .await
            .unwrap();
        let (on_failure, rx) = capture();
        let (got, failed) = drain(stream(store, plan, on_failure)).await;
        assert!(failed);
        assert_eq!(
            got.len() as u64,
            6 * P,
            "every piece before the bad one, nothing after"
        );
        assert_eq!(got, &data[..got.len()]);
        assert_eq!(rx.await.unwrap(), Failure::Mismatch { block: 1 });
    }

    /// An object store that counts how many reads are under way at once; each read yields
    /// a few times before it answers, so reads issued together are seen together.
    #[derive(Debug)]
    struct Overlap {
        inner: InMemory,
        now: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl std::fmt::Display for Overlap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Overlap")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Overlap {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let got = self.inner.get_opts(location, options).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            got
        }

        fn delete_stream(
            &self,
            locations: futures_util::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// 80 pieces in blocks of 4, on an [`Overlap`] store, read one piece at a time: 10 MiB,
    /// more than one stream may have in flight (`STORE_AHEAD_MAX`).
    async fn overlapping_blob(data: &[u8]) -> (Store, Plan, Arc<Overlap>) {
        let (mut store, mut plan) = blob_with(data, 4 * P).await;
        plan.chunk_size = P as usize;
        let overlap = Arc::new(Overlap {
            inner: InMemory::new(),
            now: Default::default(),
            most: Default::default(),
        });
        overlap
            .put(&Store::path("b"), data.to_vec().into())
            .await
            .unwrap();
        store.inner = overlap.clone();
        (store, plan, overlap)
    }

    #[tokio::test]
    async fn object_store_reads_overlap_within_a_bound_and_arrive_in_order() {
        let data: Vec<u8> = (0..80 * P).map(|i| (i % 239) as u8).collect();
        let (store, plan, overlap) = overlapping_blob(&data).await;
        let chunks = stream(store, plan, no_failure);
        let verified = chunks.blocks_verified.clone();
        let (got, failed) = drain(chunks).await;
        assert!(!failed);
        assert!(got == data, "every byte, in order");
        assert_eq!(verified.load(Ordering::Relaxed), 20);
        let most = overlap.most.load(Ordering::SeqCst);
        assert!(most >= 2, "reads did not overlap (at most {most} at once)");
        assert!(
            most as u64 <= STORE_AHEAD_MAX / P,
            "{most} reads of one piece at once, beyond the read-ahead bound"
        );
    }

    #[tokio::test]
    async fn a_stalled_client_does_not_hold_up_other_streams_of_the_blob() {
        // A's client takes one chunk and then stops reading, with its reads ahead claimed in
        // the shared blocks; B, reading the same blob from the same store, must still finish.
        let data: Vec<u8> = (0..80 * P).map(|i| (i % 233) as u8).collect();
        let (store, plan, _) = overlapping_blob(&data).await;
        let mut a = stream(store.clone(), plan.clone(), no_failure);
        let first = a.rx.recv().await.unwrap().unwrap();
        assert_eq!(&first[..], &data[..first.len()]);
        // A bound on a hang, not a wait for readiness: B needs no time from A.
        let b = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            drain(stream(store, plan, no_failure)),
        )
        .await
        .expect("B waited on reads that A started and stopped driving");
        assert!(!b.1);
        assert!(b.0 == data, "B got every byte, in order");
        drop(a);
    }

    #[tokio::test]
    async fn damaged_piece_cvs_fall_back_to_whole_blocks() {
        let data: Vec<u8> = (0..8 * P + 5).map(|i| (i % 241) as u8).collect();
        let (store, mut plan) = blob_with(&data, 4 * P).await;
        let mut cvs = plan.piece_hashes.to_vec();
        cvs[HASH_LEN + 3] ^= 1; // block 0's second piece: block 0 no longer merges
        plan.piece_hashes = cvs.into();
        plan.chunk_size = P as usize;
        let (got, failed) = drain(stream(store.clone(), plan.clone(), no_failure)).await;
        assert!(!failed);
        assert_eq!(got, data);
        // ...and a damaged block under damaged CVs is still caught, before its bytes.
        let mut bad = data.clone();
        bad[(P + 1) as usize] ^= 1;
        store
            .inner
            .put(&Store::path("b"), bad.into())
            .await
            .unwrap();
        let (got, failed) = drain(stream(store, plan, |_| std::future::ready(()))).await;
        assert!(failed);
        assert!(got.is_empty());
    }

    #[test]
    fn reads_shrink_to_one_piece_as_streams_add_up() {
        let mib = 1 << 20;
        assert_eq!(pieces_for(0, mib), 8);
        assert_eq!(pieces_for(1, mib), 8);
        assert_eq!(pieces_for(8, mib), 8);
        assert_eq!(pieces_for(16, mib), 4);
        assert_eq!(pieces_for(64, mib), 1);
        assert_eq!(pieces_for(1000, mib), 1);
        assert_eq!(pieces_for(1, P as usize), 1);
        assert_eq!(pieces_for(1, 4096), 1);
        // Whatever the count, all streams' reads stay within the budget once it binds.
        for active in 8..200 {
            let held = 3 * pieces_for(active, mib) * P * active as u64;
            assert!(
                held <= BUFFER_BUDGET || pieces_for(active, mib) == 1,
                "{active}"
            );
        }
    }

    /// A store on a local folder, with `small` as its small-file cache.
    fn local_store(root: &std::path::Path, small: Arc<crate::storage::small::SmallFiles>) -> Store {
        Store {
            local_root: Some(root.to_path_buf()),
            upstream: None,
            inner: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root).unwrap()),
            blocks: Default::default(),
            small,
        }
    }

    #[tokio::test]
    async fn small_local_files_are_served_inline_and_still_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path(), Default::default());
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 199) as u8).collect();
        std::fs::write(dir.path().join("b"), &data).unwrap();
        let (_, mut plan) = blob_with(&data, BS).await;
        plan.range = 10..4000;
        let (got, failed) = drain(stream(store.clone(), plan.clone(), no_failure)).await;
        assert!(!failed);
        assert_eq!(got, &data[10..4000]);
        assert!(read_small(&store, &plan).is_some(), "served inline");
        // A damaged small file is not served inline; the streaming path reports it.
        let mut bad = data.clone();
        bad[4999] ^= 1;
        std::fs::write(dir.path().join("b"), &bad).unwrap();
        assert!(read_small(&store, &plan).is_none());
        let (on_failure, rx) = capture();
        let (got, failed) = drain(stream(store, plan, on_failure)).await;
        assert!(failed && got.is_empty());
        assert_eq!(rx.await.unwrap(), Failure::Mismatch { block: 0 });
    }

    #[tokio::test]
    async fn a_kept_small_file_is_served_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let small = Arc::new(crate::storage::small::SmallFiles::new(
            1 << 20,
            std::time::Duration::ZERO,
        ));
        let store = local_store(dir.path(), small.clone());
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 199) as u8).collect();
        std::fs::write(dir.path().join("b"), &data).unwrap();
        let (_, mut plan) = blob_with(&data, BS).await;
        plan.range = 0..5000;
        assert_eq!(read_small(&store, &plan).unwrap(), &data[..]);
        assert_eq!(small.usage(), (5000, 1), "kept once verified");
        plan.range = 100..200;
        assert_eq!(
            read_small(&store, &plan).unwrap(),
            &data[100..200],
            "ranges too"
        );
        let b = dir.path().join("b");
        let open = || std::fs::File::open(&b).unwrap();
        // The copy is what a download uses (its bytes were verified when they were read),
        // while a scrub reads the disk: with a copy that matches another hash, a plan for
        // that hash is served the copy, and its scrub finds the disk's bytes wrong.
        let fake = Bytes::from(vec![9u8; 5000]);
        let fake_hash = *blake3::hash(&fake).as_bytes();
        small.put(&plan.key, open(), &fake_hash, &fake);
        let mut other = plan.clone();
        other.block_hashes = fake_hash.to_vec();
        assert_eq!(read_small(&store, &other).unwrap(), &fake[100..200]);
        let scrub = Plan {
            share: false,
            ..other.clone()
        };
        assert!(read_small(&store, &scrub).is_none());
        // A plan for the real hash does not take that copy: it reads the disk, and keeps it.
        assert_eq!(read_small(&store, &plan).unwrap(), &data[100..200]);
        let hash: [u8; HASH_LEN] = plan.block_hashes[..HASH_LEN].try_into().unwrap();
        assert_eq!(small.get(&plan.key, &hash).unwrap(), &data[..]);
        std::fs::remove_file(&b).unwrap();
        assert!(read_small(&store, &plan).is_none(), "a missing file misses");
        // Damage of the same size is read and caught, not hidden by the copy. (With no
        // settling time, as here, a write in the same timestamp tick could go unseen, so the
        // write's time is made distinct; the server waits for files to settle instead.)
        let mut bad = data.clone();
        bad[7] ^= 1;
        std::fs::write(&b, &data).unwrap();
        assert_eq!(read_small(&store, &plan).unwrap(), &data[100..200]);
        assert_eq!(small.usage(), (5000, 1));
        let f = std::fs::File::options().write(true).open(&b).unwrap();
        std::io::Write::write_all(&mut &f, &bad).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
            .unwrap();
        drop(f);
        assert!(read_small(&store, &plan).is_none());
        let (on_failure, rx) = capture();
        let (got, failed) = drain(stream(store, plan, on_failure)).await;
        assert!(failed && got.is_empty());
        assert_eq!(rx.await.unwrap(), Failure::Mismatch { block: 0 });
    }

    #[test]
    fn the_piece_cache_stays_within_its_budget() {
        let cache = PieceCache::default();
        let third = Bytes::from(vec![1u8; PIECE_CACHE_BYTES / 3]);
        for i in 0..10 {
            cache.put(&format!("sha{i}"), 8 << 20, third.clone());
            let held = cache.entries.lock().unwrap().usage().0;
            assert!(held <= PIECE_CACHE_BYTES, "{held}");
        }
        assert!(
            cache.get("sha9", 8 << 20).is_some(),
            "the newest entry is kept"
        );
        assert!(
            cache.get("sha9", 4 << 20).is_none(),
            "keyed by block size too"
        );
        cache.put(
            "huge",
            8 << 20,
            Bytes::from(vec![0u8; PIECE_CACHE_BYTES + 1]),
        );
        assert!(
            cache.get("huge", 8 << 20).is_none(),
            "larger than the budget: not kept"
        );
        assert!(cache.get("sha9", 8 << 20).is_some());
    }
}
