//! A Bazel remote cache on the chunk store: the content-addressable store (CAS) and the action
//! cache (AC) of each cache, spoken over REAPI gRPC ([`grpc`]) and over Bazel's HTTP cache
//! protocol (`crate::routes`).
//!
//! - A CAS blob is named by its SHA-256 and size. A blob shorter than the smallest chunk is
//!   kept whole (zstd) in its record; a longer one is cut into FastCDC chunks, stored and
//!   deduplicated with every NAR's chunks, and its record lists them ([`record`]). The bytes
//!   are checked against the digest as they arrive, before the record is written, and again
//!   as they are read (each chunk by its BLAKE3, the whole by its SHA-256): a blob that fails
//!   is never sent as a hit.
//! - An action result is kept per cache as the client sent it (checked to decode). It is
//!   answered only while every blob it names (output files, the trees of output directories
//!   and the files they list, stdout and stderr) is in the same cache's CAS; otherwise it is a
//!   miss, so that Bazel rebuilds rather than failing later on a missing output.
//! - Records live under `caches/{cache}/bazel/{cas,ac}/{sha256 hex}`: a cache sees only its
//!   own blobs, whatever other caches store. Garbage collection keeps the chunks that records
//!   name, and expires records not written within the cache's retention period; a record in
//!   use (found by FindMissingBlobs, or named by an action result that hits) is written again
//!   once older than half that period, so only unused records expire.

pub mod grpc;
pub mod record;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flywheel_core::chunk::{self, ChunkParams};
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, ErrorKind, Result};
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::config::BazelConfig;
use crate::chunk_reader::{first_item_in, ChunkReader};
use crate::ingest::{Compression, Ingester};
use crate::preflight::VerifiedChunks;
use crate::storage::{CacheRecord, Storage};
use flywheel_reapi::execution::{ActionResult, Tree};
use record::BlobRecord;

/// A CAS digest: SHA-256 and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobDigest {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Length of the content.
    pub size: u64,
}

/// SHA-256 of nothing: the empty blob, which every cache holds without storing it.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4,
    0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl BlobDigest {
    /// Parses a digest's hash (64 lowercase hex digits) and size, as clients send them.
    pub fn parse(hash: &str, size: i64) -> Result<Self> {
        let sha256 = parse_sha256(hash)?;
        let size = u64::try_from(size).map_err(|_| Error::invalid(format!("digest size {size} is negative")))?;
        Ok(BlobDigest { sha256, size })
    }

    /// Parses a proto digest.
    pub fn from_proto(digest: Option<&flywheel_reapi::execution::Digest>) -> Result<Self> {
        let digest = digest.ok_or_else(|| Error::invalid("a digest is missing"))?;
        Self::parse(&digest.hash, digest.size_bytes)
    }

    /// The proto digest.
    pub fn to_proto(self) -> flywheel_reapi::execution::Digest {
        flywheel_reapi::execution::Digest { hash: self.hex(), size_bytes: self.size as i64 }
    }

    /// The hash as lowercase hex.
    pub fn hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Whether this is the empty blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0 && self.sha256 == EMPTY_SHA256
    }
}

impl std::fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

/// Parses a SHA-256 as 64 lowercase hex digits (the only form REAPI and Bazel's HTTP cache use).
pub fn parse_sha256(hash: &str) -> Result<[u8; 32]> {
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(Error::invalid(format!("{:?} is not a SHA-256 in lowercase hex", truncate(hash))));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash, &mut out).map_err(|e| Error::invalid(format!("bad hex digest: {e}")))?;
    Ok(out)
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(80).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

/// Which store of a cache a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Action results, by action digest.
    Ac,
    /// Blobs, by content digest.
    Cas,
}

impl Store {
    fn dir(self) -> &'static str {
        match self {
            Store::Ac => "ac",
            Store::Cas => "cas",
        }
    }
}

/// The object key of a record.
pub fn record_key(cache: &str, store: Store, sha256: &[u8; 32]) -> Path {
    Path::from(format!("caches/{cache}/bazel/{}/{}", store.dir(), hex::encode(sha256)))
}

/// The prefix under which a cache's records of one store live.
pub fn records_prefix(cache: &str, store: Store) -> String {
    format!("caches/{cache}/bazel/{}", store.dir())
}

/// What a cache's lookup of an action found.
#[derive(Debug)]
pub enum ActionLookup {
    /// A result whose every output is in the cache.
    Hit(Box<ActionResult>),
    /// No result stored.
    Missing,
    /// A result is stored, but an output it names is not (or its tree does not decode).
    Incomplete,
}

/// Counters of the Bazel cache, by protocol.
#[derive(Debug, Default)]
pub struct BazelMetrics {
    /// `[grpc, http]` x `[ac hits, ac misses, cas hits, cas misses, bytes in, bytes out]`.
    counts: [[AtomicU64; 6]; 2],
}

/// Which frontend a request came through, for the metrics.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// REAPI over gRPC.
    Grpc,
    /// Bazel's HTTP cache protocol.
    Http,
}

/// What a counter counts.
#[derive(Debug, Clone, Copy)]
pub enum Counter {
    /// Action results answered.
    AcHit,
    /// Action results missing, or incomplete.
    AcMiss,
    /// Blobs found (reads, and existence checks).
    CasHit,
    /// Blobs not found.
    CasMiss,
    /// Blob and action-result bytes received.
    BytesIn,
    /// Blob and action-result bytes sent.
    BytesOut,
}

impl BazelMetrics {
    /// Adds `n` to a counter.
    pub fn add(&self, protocol: Protocol, counter: Counter, n: u64) {
        self.counts[protocol as usize][counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Writes the counters.
    pub fn collect(&self, out: &mut flywheel_core::metrics::Exposition) {
        use flywheel_core::metrics::{Kind, Labels};
        let families: [Family<'_>; 3] = [
            (
                "flywheel_bazel_ac_requests_total",
                "Bazel action-cache lookups, by protocol and result (a result with missing outputs is a miss).",
                &[(Counter::AcHit, "hit"), (Counter::AcMiss, "miss")],
            ),
            (
                "flywheel_bazel_cas_requests_total",
                "Bazel CAS blobs looked up or read, by protocol and result.",
                &[(Counter::CasHit, "hit"), (Counter::CasMiss, "miss")],
            ),
            (
                "flywheel_bazel_bytes_total",
                "Bytes of Bazel blobs and action results, by protocol and direction.",
                &[(Counter::BytesIn, "in"), (Counter::BytesOut, "out")],
            ),
        ];
        for (name, help, counters) in families {
            let label = if name.ends_with("bytes_total") { "direction" } else { "result" };
            let values = [(Protocol::Grpc, "grpc"), (Protocol::Http, "http")].into_iter().flat_map(|(protocol, pname)| {
                counters.iter().map(move |(counter, value)| {
                    let n = self.counts[protocol as usize][*counter as usize].load(Ordering::Relaxed);
                    (Labels::of(&[("protocol", pname), (label, value)]), n as f64)
                })
            });
            out.family(name, Kind::Counter, help, values.collect::<Vec<_>>());
        }
    }
}

/// A metric family of counters: name, help, and the counters with their label values.
type Family<'a> = (&'a str, &'a str, &'a [(Counter, &'a str)]);

/// A cache's CAS and action cache over the server's storage.
#[derive(Clone)]
pub struct BazelStore {
    storage: Storage,
    ingester: Ingester,
    reader: ChunkReader,
    verified: Arc<VerifiedChunks>,
    params: ChunkParams,
    zstd_level: i32,
    parallelism: usize,
    /// The configured limits.
    pub config: Arc<BazelConfig>,
    /// Counters.
    pub metrics: Arc<BazelMetrics>,
    /// Retention of caches without their own period (`gc.default-retention-period`), seconds.
    default_retention: u64,
}

/// A stream of a blob's bytes, each piece verified, ending in an error if the whole does not
/// hash to the digest.
pub type BlobStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// Blobs looked up at once by one request.
const LOOKUP_PARALLELISM: usize = 32;

/// The longest tree (a directory output's listing) whose files are checked one by one before
/// an action result is answered; a longer one is checked only for itself.
const MAX_CHECKED_TREE: u64 = 64 << 20;

impl BazelStore {
    /// A store over the server's storage, ingester and chunk reader, set up as `config` says.
    pub fn new(
        storage: Storage,
        ingester: Ingester,
        reader: ChunkReader,
        verified: Arc<VerifiedChunks>,
        config: &crate::config::ServerConfig,
    ) -> Self {
        BazelStore {
            storage,
            ingester,
            reader,
            verified,
            params: config.chunking,
            zstd_level: config.zstd_level,
            parallelism: config.chunk_parallelism,
            config: Arc::new(config.bazel.clone()),
            metrics: Arc::default(),
            default_retention: config.gc.default_retention_period,
        }
    }

    /// Refuses a blob over the configured size before any of it is read.
    pub fn check_blob_size(&self, size: u64) -> Result<()> {
        if size > self.config.max_blob_size {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("the blob has {size} bytes, over the limit of {} (bazel.max-blob-size)", self.config.max_blob_size),
            ));
        }
        Ok(())
    }

    async fn read_record(&self, cache: &str, digest: &BlobDigest) -> Result<Option<BlobRecord>> {
        let record = self.read_record_by_hash(cache, &digest.sha256).await;
        let record = self.healed(cache, digest, record).await?.flatten();
        // Same hash, other size: a client's wrong digest, not this blob.
        Ok(record.filter(|record| record.size() == digest.size))
    }

    async fn read_record_by_hash(&self, cache: &str, sha256: &[u8; 32]) -> Result<Option<BlobRecord>> {
        let key = record_key(cache, Store::Cas, sha256);
        let Some(bytes) = self.storage.get_object(&key).await? else { return Ok(None) };
        BlobRecord::decode(&bytes).map(Some).map_err(|e| Error::corrupt(format!("blob record {key}: {e}")))
    }

    /// The full digest of the blob the cache holds under `sha256`, if it holds one (Bazel's
    /// HTTP protocol names blobs by hash alone).
    pub async fn digest_of(&self, cache: &str, sha256: &[u8; 32]) -> Result<Option<BlobDigest>> {
        if *sha256 == EMPTY_SHA256 {
            return Ok(Some(BlobDigest { sha256: *sha256, size: 0 }));
        }
        Ok(self.read_record_by_hash(cache, sha256).await?.map(|record| BlobDigest { sha256: *sha256, size: record.size() }))
    }

    /// How old a record may get before a use writes it again, so that garbage collection,
    /// which expires records by their last write, keeps what is in use: half the cache's
    /// retention period; `None` when records are kept forever.
    pub fn refresh_after(&self, record: &CacheRecord) -> Option<Duration> {
        let retention = record.retention_period.map(u64::from).unwrap_or(self.default_retention);
        (retention > 0).then(|| Duration::from_secs(retention / 2))
    }

    /// Which of `digests` the cache holds, in order. A held record older than `refresh_after`
    /// is written again (see [`BazelStore::refresh_after`]).
    pub async fn has_blobs(&self, cache: &str, digests: &[BlobDigest], refresh_after: Option<Duration>) -> Result<Vec<bool>> {
        futures::stream::iter(digests.iter().copied())
            .map(|digest| {
                let cache = cache.to_string();
                async move {
                    if digest.is_empty() {
                        return Ok(true);
                    }
                    let key = record_key(&cache, Store::Cas, &digest.sha256);
                    match self.storage.object_store().head(&key).await {
                        // The record's length does not tell the blob's: a hash stored with
                        // another size is caught when it is read.
                        Ok(meta) => {
                            self.refresh_if_old(&key, &meta, None, refresh_after).await;
                            Ok(true)
                        }
                        Err(object_store::Error::NotFound { .. }) => Ok(false),
                        Err(err) => Err(Error::unavailable(format!("looking up {key}: {err}"))),
                    }
                }
            })
            .buffered(LOOKUP_PARALLELISM)
            .collect::<Vec<Result<bool>>>()
            .await
            .into_iter()
            .collect()
    }

    /// Writes a record again, as it is (`bytes` when the caller has read them already), once
    /// it is older than `refresh_after`. Best effort: a failure only leaves the record to
    /// expire on its first write's schedule.
    async fn refresh_if_old(
        &self,
        key: &Path,
        meta: &object_store::ObjectMeta,
        bytes: Option<Bytes>,
        refresh_after: Option<Duration>,
    ) {
        let Some(refresh_after) = refresh_after else { return };
        let age_ms = self.storage.clock().now_ms().saturating_sub(crate::storage::modified_ms(meta));
        if age_ms < refresh_after.as_millis() as u64 {
            return;
        }
        let rewritten = async {
            let bytes = match bytes {
                Some(bytes) => bytes,
                None => self.storage.get_object(key).await?.ok_or_else(|| Error::not_found("gone"))?,
            };
            self.storage.object_store().put(key, PutPayload::from(bytes)).await.map_err(|e| Error::unavailable(e.to_string()))?;
            Ok::<_, Error>(())
        };
        if let Err(err) = rewritten.await {
            tracing::warn!(%key, error = %err, "could not refresh a Bazel record in use");
        }
    }

    /// Stores a blob read from `body` (compressed as `compression` says), which must hash to
    /// `digest`; the record is written only once it does.
    pub async fn put_blob(
        &self,
        cache: &str,
        digest: BlobDigest,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        compression: Compression,
    ) -> Result<()> {
        self.check_blob_size(digest.size)?;
        let mismatch = |size: u64, sha: &[u8; 32]| {
            Error::invalid(format!(
                "the blob's content ({}/{size}) does not match its digest {digest}",
                hex::encode(sha)
            ))
        };
        if digest.size < u64::from(self.params.min_size) {
            // Small: read whole (bounded by the digest's size) and kept in the record.
            let data = match compression {
                Compression::None => read_bounded(body, digest.size).await?,
                _ => {
                    let sent = read_bounded(body, chunk::max_frame_len(digest.size) + 1024).await?;
                    compression.decode_all(Bytes::from(sent), digest.size as usize)?
                }
            };
            let sha: [u8; 32] = Sha256::digest(&data).into();
            if sha != digest.sha256 || data.len() as u64 != digest.size {
                return Err(mismatch(data.len() as u64, &sha));
            }
            if digest.is_empty() {
                return Ok(());
            }
            let level = self.zstd_level;
            let record = tokio::task::spawn_blocking(move || BlobRecord::inline(&data, level))
                .await
                .map_err(|e| Error::internal(format!("compressing a blob: {e}")))??;
            return self.write_record(cache, Store::Cas, &digest.sha256, record.encode()).await;
        }
        let ingested = self.ingester.ingest_blob(body, compression, digest.size).await?;
        if ingested.sha256.0 != digest.sha256 || ingested.size != digest.size {
            return Err(mismatch(ingested.size, &ingested.sha256.0));
        }
        let record = BlobRecord::Chunks { size: ingested.size, chunks: ingested.chunks.clone() };
        self.write_record(cache, Store::Cas, &digest.sha256, record.encode()).await?;
        if let Err(err) = ingested.finish().await {
            // The record is the publication: it must not stay naming chunks a collection may
            // have taken, or FindMissingBlobs would keep the blob from being sent again.
            self.forget_blob(cache, &digest, "its upload could not be confirmed").await;
            return Err(err);
        }
        Ok(())
    }

    /// A blob as a zstd stream, or `None` if the cache does not holds it: a chunked blob is
    /// sent as its stored frames (each checked as [`ChunkReader::frames`] checks them, so by
    /// BLAKE3 rather than by decompressing when it verified before), an inline one as its
    /// frame once it hashed right.
    pub async fn read_blob_zstd(&self, cache: &str, digest: BlobDigest) -> Result<Option<BlobStream>> {
        if digest.is_empty() {
            let frame = zstd::bulk::compress(&[], 1).map_err(|e| Error::internal(format!("zstd: {e}")))?;
            return Ok(Some(Box::pin(futures::stream::once(async move { Ok(Bytes::from(frame)) }))));
        }
        let Some(record) = self.read_record(cache, &digest).await? else { return Ok(None) };
        let stream: Result<BlobStream> = async {
            match record {
                BlobRecord::Inline { size, frame } => {
                    inline_verified(&frame, size, &digest, cache)?;
                    Ok(Box::pin(futures::stream::once(async move { Ok(frame) })) as BlobStream)
                }
                BlobRecord::Chunks { chunks, .. } => {
                    self.verified.check(&self.storage, &Sha256Hash(digest.sha256), &chunks, self.parallelism).await?;
                    Ok(Box::pin(first_item_in(self.reader.frames(chunks)).await?) as BlobStream)
                }
            }
        }
        .await;
        self.healed(cache, &digest, stream).await
    }

    async fn write_record(&self, cache: &str, store: Store, sha256: &[u8; 32], bytes: Bytes) -> Result<()> {
        let key = record_key(cache, store, sha256);
        self.storage
            .object_store()
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(|e| Error::unavailable(format!("writing {key}: {e}")))?;
        Ok(())
    }

    /// A blob's bytes, or `None` if the cache does not hold it. A missing or damaged chunk
    /// fails here, before the first byte; the stream's pieces are each verified, and the
    /// stream ends in an error rather than its last piece if the whole does not hash right.
    pub async fn read_blob(&self, cache: &str, digest: BlobDigest) -> Result<Option<BlobStream>> {
        if digest.is_empty() {
            return Ok(Some(Box::pin(futures::stream::empty())));
        }
        let Some(record) = self.read_record(cache, &digest).await? else { return Ok(None) };
        self.healed(cache, &digest, self.stream_record(cache, digest, record).await).await
    }

    /// A read's outcome, with a blob found damaged (a chunk missing or failing its check, a
    /// record that does not decode) taken out of the cache and answered as missing: Bazel
    /// then sees a miss, runs the action and uploads the blob again, which repairs it.
    async fn healed<T>(&self, cache: &str, digest: &BlobDigest, read: Result<T>) -> Result<Option<T>> {
        match read {
            Ok(value) => Ok(Some(value)),
            Err(err) if err.kind() == ErrorKind::Corrupt => {
                self.forget_blob(cache, digest, &err.to_string()).await;
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Deletes a blob's record (best effort: a failure is logged, and the next read finds the
    /// damage again).
    async fn forget_blob(&self, cache: &str, digest: &BlobDigest, why: &str) {
        let key = record_key(cache, Store::Cas, &digest.sha256);
        tracing::warn!(%key, why, "Bazel blob taken out of its cache");
        if let Err(err) = self.storage.delete_object(&key).await {
            tracing::error!(%key, error = %err, "could not delete a damaged Bazel blob record");
        }
    }

    /// [`BazelStore::read_blob`] by hash alone (Bazel's HTTP protocol names blobs so), with
    /// the blob's full digest.
    pub async fn read_blob_by_hash(&self, cache: &str, sha256: &[u8; 32]) -> Result<Option<(BlobDigest, BlobStream)>> {
        if *sha256 == EMPTY_SHA256 {
            return Ok(Some((BlobDigest { sha256: *sha256, size: 0 }, Box::pin(futures::stream::empty()))));
        }
        let Some(record) = self.read_record_by_hash(cache, sha256).await? else { return Ok(None) };
        let digest = BlobDigest { sha256: *sha256, size: record.size() };
        let stream = self.healed(cache, &digest, self.stream_record(cache, digest, record).await).await?;
        Ok(stream.map(|stream| (digest, stream)))
    }

    async fn stream_record(&self, cache: &str, digest: BlobDigest, record: BlobRecord) -> Result<BlobStream> {
        match record {
            BlobRecord::Inline { size, frame } => {
                let data = Bytes::from(inline_verified(&frame, size, &digest, cache)?);
                Ok(Box::pin(futures::stream::once(async move { Ok(data) })))
            }
            BlobRecord::Chunks { chunks, .. } => {
                self.verified
                    .check(&self.storage, &Sha256Hash(digest.sha256), &chunks, self.parallelism)
                    .await?;
                let data = first_item_in(self.reader.chunks(chunks)).await?;
                Ok(Box::pin(hashed(data, digest)))
            }
        }
    }

    /// A blob whole in memory, for batch reads; `None` if the cache does not hold it.
    pub async fn read_blob_bytes(&self, cache: &str, digest: BlobDigest) -> Result<Option<Bytes>> {
        let Some(mut stream) = self.read_blob(cache, digest).await? else { return Ok(None) };
        let collected = async {
            let mut out = bytes::BytesMut::with_capacity(digest.size.min(16 << 20) as usize);
            while let Some(piece) = stream.next().await {
                out.extend_from_slice(&piece?);
            }
            Ok(out.freeze())
        }
        .await;
        self.healed(cache, &digest, collected).await
    }

    /// Stores an action result as sent, once it decodes.
    pub async fn put_action_result(&self, cache: &str, action: &[u8; 32], bytes: Bytes) -> Result<()> {
        if bytes.len() as u64 > self.config.max_action_result_size {
            return Err(Error::invalid(format!(
                "the action result has {} bytes, over the limit of {} (bazel.max-action-result-size)",
                bytes.len(),
                self.config.max_action_result_size
            )));
        }
        ActionResult::decode(bytes.clone()).map_err(|e| Error::invalid(format!("the action result does not decode: {e}")))?;
        self.write_record(cache, Store::Ac, action, bytes).await
    }

    /// The action result stored for `action`, answered only if every output it names is in
    /// the cache (see the module's doc).
    pub async fn action_result(
        &self,
        cache: &str,
        action: &[u8; 32],
        refresh_after: Option<Duration>,
    ) -> Result<(ActionLookup, Option<Bytes>)> {
        let key = record_key(cache, Store::Ac, action);
        let (bytes, meta) = match self.storage.object_store().get(&key).await {
            Ok(result) => {
                let meta = result.meta.clone();
                (result.bytes().await.map_err(|e| Error::unavailable(format!("reading {key}: {e}")))?, meta)
            }
            Err(object_store::Error::NotFound { .. }) => return Ok((ActionLookup::Missing, None)),
            Err(err) => return Err(Error::unavailable(format!("reading {key}: {err}"))),
        };
        let result = match ActionResult::decode(bytes.clone()) {
            Ok(result) => result,
            Err(err) => {
                tracing::warn!(%key, error = %err, "a stored action result does not decode; answered as a miss");
                return Ok((ActionLookup::Incomplete, None));
            }
        };
        if !self.outputs_present(cache, &result, refresh_after).await? {
            return Ok((ActionLookup::Incomplete, None));
        }
        self.refresh_if_old(&key, &meta, Some(bytes.clone()), refresh_after).await;
        Ok((ActionLookup::Hit(Box::new(result)), Some(bytes)))
    }

    /// Whether every blob `result` names is in the cache: output files, stdout and stderr, and
    /// for each output directory its tree and the files the tree lists.
    async fn outputs_present(&self, cache: &str, result: &ActionResult, refresh_after: Option<Duration>) -> Result<bool> {
        let mut digests = Vec::new();
        let mut trees = Vec::new();
        for file in &result.output_files {
            digests.push(file.digest.as_ref());
        }
        for dir in &result.output_directories {
            digests.push(dir.tree_digest.as_ref());
            if let Some(tree) = &dir.tree_digest {
                trees.push(tree);
            }
        }
        digests.extend([result.stdout_digest.as_ref(), result.stderr_digest.as_ref()].into_iter().filter(|d| d.is_some()));
        let mut parsed = Vec::with_capacity(digests.len());
        for digest in digests {
            match BlobDigest::from_proto(digest) {
                Ok(digest) => parsed.push(digest),
                // A result naming a digest that does not parse can never be a complete hit.
                Err(_) => return Ok(false),
            }
        }
        for tree in trees {
            let Ok(tree_digest) = BlobDigest::from_proto(Some(tree)) else { return Ok(false) };
            if tree_digest.size > MAX_CHECKED_TREE {
                continue;
            }
            let Some(bytes) = self.read_blob_bytes(cache, tree_digest).await? else { return Ok(false) };
            let Ok(tree) = Tree::decode(bytes) else { return Ok(false) };
            for directory in tree.root.iter().chain(tree.children.iter()) {
                for file in &directory.files {
                    match BlobDigest::from_proto(file.digest.as_ref()) {
                        Ok(digest) => parsed.push(digest),
                        Err(_) => return Ok(false),
                    }
                }
            }
        }
        parsed.sort_by_key(|d| d.sha256);
        parsed.dedup();
        Ok(self.has_blobs(cache, &parsed, refresh_after).await?.into_iter().all(|present| present))
    }
}

/// The blob an inline record holds, once it decompresses to `size` bytes that hash to
/// `digest`.
fn inline_verified(frame: &[u8], size: u64, digest: &BlobDigest, cache: &str) -> Result<Vec<u8>> {
    let data = zstd::bulk::decompress(frame, size as usize)
        .map_err(|e| Error::corrupt(format!("blob {digest} in cache {cache}: {e}")))?;
    let sha: [u8; 32] = Sha256::digest(&data).into();
    if sha != digest.sha256 || data.len() as u64 != size {
        return Err(Error::corrupt(format!("blob {digest} in cache {cache} does not hash to its name")));
    }
    Ok(data)
}

/// Reads a body of at most `size` bytes whole; a longer one is refused.
async fn read_bounded(body: impl Stream<Item = io::Result<Bytes>> + Send, size: u64) -> Result<Vec<u8>> {
    let mut body = std::pin::pin!(body);
    let mut data = Vec::with_capacity(size as usize);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| Error::invalid(format!("reading the blob: {e}")))?;
        if data.len() as u64 + piece.len() as u64 > size {
            return Err(Error::invalid(format!("the blob is longer than its digest's {size} bytes")));
        }
        data.extend_from_slice(&piece);
    }
    Ok(data)
}

/// Passes `data` on, hashing it; if the whole does not match `digest`, the stream ends in an
/// error in place of success (each piece was verified already by its chunk's BLAKE3).
fn hashed(data: impl Stream<Item = Result<Bytes>> + Send + 'static, digest: BlobDigest) -> impl Stream<Item = Result<Bytes>> + Send {
    let state = (Box::pin(data), Sha256::new(), 0u64, false);
    futures::stream::unfold(state, move |(mut data, mut sha, mut len, done)| async move {
        if done {
            return None;
        }
        match data.next().await {
            Some(Ok(piece)) => {
                sha.update(&piece);
                len += piece.len() as u64;
                Some((Ok(piece), (data, sha, len, false)))
            }
            Some(Err(err)) => Some((Err(err), (data, sha, len, true))),
            None => {
                let got: [u8; 32] = sha.finalize_reset().into();
                if got == digest.sha256 && len == digest.size {
                    None
                } else {
                    Some((Err(Error::corrupt(format!("blob {digest} read back as {}/{len}", hex::encode(got)))), (data, sha, len, true)))
                }
            }
        }
    })
}
