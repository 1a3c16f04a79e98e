//! A NAR stream in; verified, deduplicated, compressed chunks and a manifest out.
//!
//! The pipeline keeps memory bounded whatever the NAR's size: one blocking thread decodes the
//! upload, hashes it (SHA-256), validates and indexes it as a NAR, and cuts chunks; a bounded
//! queue hands chunks to tasks that name them (BLAKE3), skip those already stored (and young
//! enough to count on), compress the rest and write them in parallel.
//!
//! A failed upload leaves the chunks it wrote for garbage collection. It cannot delete them:
//! another upload, in this process or in another replica over the same bucket, may have found
//! them stored in the meantime and counted on them. Chunks are counted on only while they are
//! young (see [`ReuseWindow`]), so an old unreferenced chunk that a collection is about to sweep
//! is written again rather than trusted.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use flywheel_core::chunk::{self, ChunkHash, ChunkParams, Chunker};
use flywheel_core::manifest::{ChunkRef, Manifest, MANIFEST_VERSION};
use flywheel_core::nar::{self, ParsedNar};
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, Result};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::chunk_reader::ChunkReader;
use crate::metrics::Metrics;
use crate::preflight::VerifiedChunks;
use crate::storage::{Reuse, ReuseWindow, Storage};

/// How an uploaded NAR is compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain NAR.
    None,
    /// xz (Nix's default for `nix copy --to http://`).
    Xz,
    /// zstd.
    Zstd,
    /// bzip2.
    Bzip2,
    /// Brotli.
    Brotli,
}

impl Compression {
    /// From the name of a file Nix PUTs (`....nar.xz`, `....nar.zst`, ...).
    pub fn from_file_name(name: &str) -> Result<Self> {
        let ext = name
            .rsplit_once(".nar")
            .map(|(_, ext)| ext)
            .ok_or_else(|| Error::invalid(format!("{name:?} is not a NAR file name")))?;
        match ext {
            "" => Ok(Compression::None),
            ".xz" => Ok(Compression::Xz),
            ".zst" => Ok(Compression::Zstd),
            ".bz2" => Ok(Compression::Bzip2),
            ".br" => Ok(Compression::Brotli),
            other => Err(Error::invalid(format!(
                "unsupported NAR compression {other:?}: use xz, zstd, bzip2, br or none"
            ))),
        }
    }

    /// From an HTTP `Content-Encoding` (absent or `identity`: none), as Nix's
    /// `log-compression` and friends set it.
    pub fn from_content_encoding(encoding: Option<&str>) -> Result<Self> {
        match encoding.map(str::trim) {
            None | Some("") | Some("identity") | Some("none") => Ok(Compression::None),
            Some("xz") => Ok(Compression::Xz),
            Some("zstd") => Ok(Compression::Zstd),
            Some("bzip2") => Ok(Compression::Bzip2),
            Some("br") => Ok(Compression::Brotli),
            Some(other) => Err(Error::invalid(format!("unsupported Content-Encoding {other:?}: use xz, zstd, bzip2, br or none"))),
        }
    }

    /// Decompresses `compressed` whole, refusing more than `limit` bytes of output.
    pub fn decode_all(self, compressed: Bytes, limit: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.decoder(io::Cursor::new(compressed))?.take(limit as u64 + 1).read_to_end(&mut out)?;
        if out.len() > limit {
            return Err(Error::invalid(format!("the body decompresses to more than {limit} bytes")));
        }
        Ok(out)
    }

    fn decoder<R: Read + Send + 'static>(self, reader: R) -> io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            Compression::Xz => Box::new(DecodeErrors(xz2::read::XzDecoder::new_multi_decoder(reader))),
            Compression::Zstd => Box::new(DecodeErrors(zstd::stream::read::Decoder::new(reader)?)),
            Compression::Bzip2 => Box::new(DecodeErrors(bzip2::read::MultiBzDecoder::new(reader))),
            Compression::Brotli => Box::new(DecodeErrors(brotli::Decompressor::new(reader, 64 * 1024))),
        })
    }
}

/// Reports a decoder's failure as bad input, which it is.
struct DecodeErrors<R>(R);

impl<R: Read> Read for DecodeErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|err| {
            if err.get_ref().is_some_and(|inner| inner.is::<Error>()) || err.kind() == io::ErrorKind::UnexpectedEof {
                err
            } else {
                io::Error::new(io::ErrorKind::InvalidData, format!("the upload does not decompress: {err}"))
            }
        })
    }
}

/// Blocking `Read` over body pieces that an async task forwards.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(err)) => return Err(err),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Where the NAR reader sends the chunks it cuts: each with its hash, in NAR order.
type ChunkSender = mpsc::Sender<(ChunkHash, Vec<u8>)>;

/// Hashes what the NAR reader consumes and, when chunking, cuts it into chunks.
struct Tee<R> {
    inner: R,
    sha: Sha256,
    chunker: Option<(Chunker, ChunkSender)>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        if let Some((chunker, out)) = &mut self.chunker {
            chunker.push(&buf[..n], &mut |chunk| send_chunk(out, chunk))?;
        }
        Ok(n)
    }
}

/// Names a chunk and hands it on. Hashing here, on the reader's thread, costs little (BLAKE3
/// is several times faster than the SHA-256 this thread computes anyway) and saves a hop.
fn send_chunk(out: &ChunkSender, chunk: Vec<u8>) -> io::Result<()> {
    out.blocking_send((ChunkHash::of(&chunk), chunk)).map_err(|_| io::Error::other("chunk storage stopped"))
}

/// Reads a NAR from `body` on a blocking thread: validates it, hashes it, and, given a sender,
/// cuts it into chunks. The thread keeps `slot` until it is done, so the slots bound the
/// blocking threads that uploads hold, whatever their clients do.
fn spawn_nar_reader(
    body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    compression: Compression,
    chunks: Option<(ChunkParams, ChunkSender)>,
    slot: OwnedSemaphorePermit,
) -> tokio::task::JoinHandle<Result<(ParsedNar, Sha256Hash)>> {
    spawn_reader(body, compression, chunks, slot, |tee| nar::parse(tee))
}

/// Reads `body` on a blocking thread as [`spawn_nar_reader`] does, handing the decoded bytes
/// to `consume` through a reader that hashes them (SHA-256) and cuts chunks.
fn spawn_reader<T: Send + 'static>(
    body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    compression: Compression,
    chunks: Option<(ChunkParams, ChunkSender)>,
    slot: OwnedSemaphorePermit,
    consume: impl FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(T, Sha256Hash)>> {
    let (body_tx, body_rx) = mpsc::channel::<io::Result<Bytes>>(32);
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        while let Some(item) = body.next().await {
            // The body fails when its client stalls or goes away: bad input, not a server fault.
            // Errors that know their kind already (a stored chunk that fails its check while a
            // commit is rebuilt) keep it.
            let item = item.map_err(|err| {
                if err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    err
                } else {
                    io::Error::from(Error::invalid(format!("reading the upload: {err}")))
                }
            });
            if body_tx.send(item).await.is_err() {
                break;
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let reader = ChannelReader { rx: body_rx, current: Bytes::new() };
        let decoded = compression.decoder(reader)?;
        let mut tee = Tee {
            inner: decoded,
            sha: Sha256::new(),
            chunker: chunks.map(|(params, tx)| (Chunker::new(params), tx)),
        };
        let consumed = consume(&mut tee)?;
        if let Some((chunker, out)) = tee.chunker.take() {
            chunker.finish(&mut |chunk| send_chunk(&out, chunk))?;
        }
        let digest: [u8; 32] = tee.sha.finalize().into();
        Ok((consumed, Sha256Hash(digest)))
    })
}

fn join_error(err: tokio::task::JoinError) -> Error {
    Error::internal(format!("NAR reader task failed: {err}"))
}

/// Numbers about one ingested NAR.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestStats {
    /// Chunks in the NAR.
    pub chunks: usize,
    /// Chunks that were not stored before.
    pub new_chunks: usize,
    /// Compressed bytes newly written.
    pub new_stored_bytes: u64,
    /// Uncompressed bytes of chunks that were stored already.
    pub deduplicated_bytes: u64,
}

/// A NAR whose chunks are stored, and whose manifest is not yet.
pub struct Ingested {
    /// The manifest to store once the caller has checked the NAR against its metadata.
    pub manifest: Manifest,
    /// Numbers.
    pub stats: IngestStats,
    /// Stale chunks this upload wrote again: checked once more after the manifest is stored.
    refreshed: Vec<ChunkHash>,
    started: u64,
    window: ReuseWindow,
    storage: Storage,
}

impl Ingested {
    /// Stores the manifest; from then on the chunks belong to it (garbage collection keeps
    /// what a stored manifest lists). Fails as [`Storage::put_upload_manifest`] does; the
    /// caller then must not publish the path.
    pub async fn commit(self) -> Result<(Manifest, IngestStats)> {
        self.storage.put_upload_manifest(&self.manifest, self.started, self.window, &self.refreshed, "upload").await?;
        Ok((self.manifest, self.stats))
    }
}

/// A blob whose chunks are stored, and whose record (what names the chunks) is not yet.
pub struct IngestedBlob {
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// Its length.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: Sha256Hash,
    /// Numbers.
    pub stats: IngestStats,
    refreshed: Vec<ChunkHash>,
    started: u64,
    window: ReuseWindow,
    storage: Storage,
}

impl IngestedBlob {
    /// Once the caller has stored what names the chunks: fails as
    /// [`Storage::check_upload_finished`] does, and then the blob must not be counted on.
    pub async fn finish(self) -> Result<IngestStats> {
        self.storage.check_upload_finished(self.started, &self.window, &self.refreshed, "upload").await?;
        Ok(self.stats)
    }
}

/// An upload read and its chunks stored.
struct UploadRead<T> {
    /// What the reader made of the bytes (a parsed NAR, a length).
    consumed: T,
    sha256: Sha256Hash,
    chunks: Vec<ChunkRef>,
    stats: IngestStats,
    /// Stale chunks written again (see [`Ingested`]).
    refreshed: Vec<ChunkHash>,
    /// When the upload began, on the storage's clock.
    started: u64,
}

/// What storing one chunk did.
enum Stored {
    /// It was new; this many compressed bytes were written.
    Written(u64),
    /// It was stored but stale, and was written again.
    Refreshed(u64),
    /// A fresh copy was stored already.
    Deduplicated,
}

/// How an ingester cuts, compresses and stores chunks.
#[derive(Debug, Clone, Copy)]
pub struct IngestSettings {
    /// FastCDC sizes.
    pub params: ChunkParams,
    /// zstd level of each stored frame.
    pub zstd_level: i32,
    /// Chunks compressed and stored at once, per upload.
    pub parallelism: usize,
}

/// Turns NAR uploads into stored chunks.
#[derive(Clone)]
pub struct Ingester {
    storage: Storage,
    settings: IngestSettings,
    window: ReuseWindow,
    metrics: Arc<Metrics>,
    /// NAR readers running at once, each on a thread of the blocking pool: without a bound,
    /// stalled uploads took every thread, and local storage reads (which need one) hung.
    readers: Arc<Semaphore>,
    /// How long an upload waits for a reader before it is refused.
    reader_wait: std::time::Duration,
    /// Frames known to verify: those written here are added, so their first download need not
    /// decompress them.
    verified: Arc<VerifiedChunks>,
}

impl Ingester {
    /// An ingester writing to `storage`, counting on stored chunks within `window`.
    pub fn new(storage: Storage, settings: IngestSettings, window: ReuseWindow, metrics: Arc<Metrics>) -> Self {
        let limits = crate::config::LimitsConfig::default();
        Ingester {
            storage,
            settings,
            window,
            metrics,
            readers: Arc::new(Semaphore::new(0)),
            reader_wait: std::time::Duration::ZERO,
            verified: Arc::default(),
        }
        .with_reader_limit(limits.max_uploads, std::time::Duration::from_secs(limits.upload_queue_timeout))
    }

    /// Shares `verified` (the server's) instead of a memory of its own.
    pub fn with_verified_chunks(mut self, verified: Arc<VerifiedChunks>) -> Self {
        self.verified = verified;
        self
    }

    /// Runs at most `readers` NAR readers at once (`limits.max-uploads`); a further upload
    /// waits up to `wait` for one, then fails as unavailable.
    pub fn with_reader_limit(mut self, readers: usize, wait: std::time::Duration) -> Self {
        self.readers = Arc::new(Semaphore::new(readers));
        self.reader_wait = wait;
        self
    }

    /// A reader slot, or `Unavailable` when none frees up in time.
    async fn reader_slot(&self) -> Result<OwnedSemaphorePermit> {
        match tokio::time::timeout(self.reader_wait, self.readers.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(Error::internal("the NAR reader slots are closed")),
            Err(_) => Err(Error::unavailable(format!(
                "every NAR reader stayed busy for {} s (limits.max-uploads); try again later",
                self.reader_wait.as_secs()
            ))),
        }
    }

    /// Reads a NAR from `body`, stores its missing chunks, and returns its manifest (not yet
    /// stored). On failure, the chunks it stored stay for garbage collection.
    pub async fn ingest(
        &self,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        compression: Compression,
    ) -> Result<Ingested> {
        let read = self.read_and_store(body, compression, |tee| nar::parse(tee)).await?;
        let UploadRead { consumed: parsed, sha256: nar_hash, chunks: refs, stats, refreshed, started } = read;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            nar_hash,
            nar_size: parsed.nar_size,
            chunks: refs,
            root: parsed.root,
        };
        if let Err(err) = manifest.validate() {
            return Err(Error::internal(format!("ingest built an inconsistent manifest: {err}")));
        }
        self.metrics.nar_bytes_in.fetch_add(manifest.nar_size, std::sync::atomic::Ordering::Relaxed);
        Ok(Ingested { manifest, stats, refreshed, started, window: self.window.clone(), storage: self.storage.clone() })
    }

    /// Reads an upload from `body` through `consume` (on a blocking thread, which the reader
    /// slots bound), hashing it and storing the chunks it is cut into.
    async fn read_and_store<T: Send + 'static>(
        &self,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        compression: Compression,
        consume: impl FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    ) -> Result<UploadRead<T>> {
        // A client that sends headers and then nothing must not hold a reader: the slot is
        // taken once the body's first bytes are here (a stalled body ends at the connection's
        // body timeout).
        let mut body = Box::pin(body);
        let first = body.next().await;
        let slot = self.reader_slot().await?;
        let body = futures::stream::iter(first).chain(body);
        let (chunk_tx, chunk_rx) = mpsc::channel::<(ChunkHash, Vec<u8>)>(self.settings.parallelism);
        let started = self.storage.clock().now_ms();
        let reusable_after = self.window.reusable_after();
        let reader = spawn_reader(body, compression, Some((self.settings.params, chunk_tx)), slot, consume);
        let (chunks, stats, refreshed, store_error) = self.store_chunks(chunk_rx, reusable_after).await;
        let read = reader.await.map_err(join_error).and_then(|r| r);
        match (store_error, read) {
            (Some(err), _) | (None, Err(err)) => Err(err),
            (None, Ok((consumed, sha256))) => Ok(UploadRead { consumed, sha256, chunks, stats, refreshed, started }),
        }
    }

    /// Stores the chunks a reader cuts, in parallel and in order, until the reader is done or
    /// a chunk fails to store. Returns what was stored, and the error that stopped it.
    async fn store_chunks(
        &self,
        chunk_rx: mpsc::Receiver<(ChunkHash, Vec<u8>)>,
        reusable_after: u64,
    ) -> (Vec<ChunkRef>, IngestStats, Vec<ChunkHash>, Option<Error>) {
        let mut refreshed = Vec::new();
        let mut refs = Vec::new();
        let mut stats = IngestStats::default();
        let stored = futures::stream::unfold(chunk_rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
            .map(|(hash, data)| {
                // A task per chunk, so compression runs on every worker thread.
                let task = tokio::spawn(self.clone().store_chunk(hash, data, reusable_after));
                async move { task.await.map_err(|e| Error::internal(format!("chunk task failed: {e}")))? }
            })
            .buffered(self.settings.parallelism);
        let mut stored = std::pin::pin!(stored);
        while let Some(result) = stored.next().await {
            match result {
                Ok((chunk_ref, stored)) => {
                    stats.chunks += 1;
                    match stored {
                        Stored::Written(bytes) => {
                            stats.new_chunks += 1;
                            stats.new_stored_bytes += bytes;
                        }
                        Stored::Refreshed(bytes) => {
                            stats.new_stored_bytes += bytes;
                            stats.deduplicated_bytes += u64::from(chunk_ref.size);
                            refreshed.push(chunk_ref.hash);
                        }
                        Stored::Deduplicated => stats.deduplicated_bytes += u64::from(chunk_ref.size),
                    }
                    refs.push(chunk_ref);
                }
                Err(err) => return (refs, stats, refreshed, Some(err)),
            }
        }
        (refs, stats, refreshed, None)
    }

    /// Reads a blob of any content (a Bazel CAS blob) from `body`, decoding it as
    /// `compression` says and refusing more than `limit` bytes of content, and stores its chunks as [`Ingester::ingest`] stores a NAR's. The caller checks
    /// the returned size and SHA-256 against what the blob should be, then stores what names
    /// the chunks and calls [`IngestedBlob::finish`].
    pub async fn ingest_blob(
        &self,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        compression: Compression,
        limit: u64,
    ) -> Result<IngestedBlob> {
        let read = self
            .read_and_store(body, compression, move |tee| {
                let copied = io::copy(&mut tee.take(limit + 1), &mut io::sink())?;
                if copied > limit {
                    return Err(Error::invalid(format!("the blob is longer than {limit} bytes")));
                }
                Ok(copied)
            })
            .await?;
        let UploadRead { consumed: size, sha256, chunks, stats, refreshed, started } = read;
        Ok(IngestedBlob { chunks, size, sha256, stats, refreshed, started, window: self.window.clone(), storage: self.storage.clone() })
    }

    /// Stores a chunk unless a fresh copy is stored already (see [`ReuseWindow`]).
    async fn store_chunk(self, hash: ChunkHash, data: Vec<u8>, reusable_after: u64) -> Result<(ChunkRef, Stored)> {
        let chunk_ref = ChunkRef { hash, size: data.len() as u32 };
        // Compressing a chunk takes a few hundred microseconds: short enough to do on the
        // worker (or the storage I/O thread), and cheaper than a hop to the blocking pool for
        // every chunk.
        let level = self.settings.zstd_level;
        let make_frame = move || chunk::compress(&data, level).map(Bytes::from);
        let (reuse, written) = self.storage.put_chunk_unless_fresh(hash, reusable_after, make_frame).await?;
        let Some((frame, version)) = written else {
            self.metrics.chunks_deduplicated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok((chunk_ref, Stored::Deduplicated));
        };
        let stored = frame.len() as u64;
        // Made here from bytes just hashed: it verifies by construction.
        self.verified.remember(hash, version, &frame);
        self.metrics.stored_bytes.fetch_add(stored, std::sync::atomic::Ordering::Relaxed);
        if reuse == Reuse::Stale {
            self.metrics.chunks_deduplicated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok((chunk_ref, Stored::Refreshed(stored)));
        }
        self.metrics.chunks_stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((chunk_ref, Stored::Written(stored)))
    }

    /// Rebuilds a NAR from stored chunks and checks it, for a commit through the chunk API:
    /// every chunk must be stored and verify, and the whole must be a valid NAR.
    pub async fn verify_chunks(&self, refs: Vec<ChunkRef>) -> Result<Manifest> {
        let slot = self.reader_slot().await?;
        let reader = ChunkReader {
            storage: self.storage.clone(),
            parallelism: self.settings.parallelism,
            // A commit is rare next to downloads: it is held only to its own parallelism.
            reads: Arc::new(Semaphore::new(self.settings.parallelism)),
            metrics: self.metrics.clone(),
            verified: self.verified.clone(),
        };
        let chunks = reader.chunks(refs.clone()).map(|item| item.map_err(io::Error::from));
        let reader = spawn_nar_reader(chunks, Compression::None, None, slot);
        let (parsed, nar_hash) = reader.await.map_err(join_error)??;
        let manifest =
            Manifest { version: MANIFEST_VERSION, nar_hash, nar_size: parsed.nar_size, chunks: refs, root: parsed.root };
        manifest.validate()?;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the upload file names (fuzzing stand-ins; see the core crate's
    //! `tests/properties`).

    use super::*;
    use proptest::prelude::*;
    use crate::proptest_config as config;

    proptest! {
        #![proptest_config(config(1000))]

        #[test]
        fn nar_file_names_name_their_compression(stem in "[0-9a-z.]{0,60}", ext in 0usize..5) {
            let (suffix, compression) = [
                ("", Compression::None),
                (".xz", Compression::Xz),
                (".zst", Compression::Zstd),
                (".bz2", Compression::Bzip2),
                (".br", Compression::Brotli),
            ][ext];
            prop_assert_eq!(Compression::from_file_name(&format!("{stem}.nar{suffix}")).unwrap(), compression);
        }

        #[test]
        fn any_file_name_is_refused_or_a_nar(name in prop_oneof![".{0,40}", "[a-z.]{0,10}\\.nar[a-z.]{0,6}"]) {
            match Compression::from_file_name(&name) {
                Ok(_) => prop_assert!(name.contains(".nar")),
                Err(err) => prop_assert_eq!(err.kind(), flywheel_core::ErrorKind::InvalidInput),
            }
        }
    }
}
