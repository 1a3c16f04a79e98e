//! Checking a NAR's chunks before its first byte goes out, so that a missing or corrupt chunk
//! is a 5xx rather than a 200 cut short (which Attic serves, and Nix reports as a hash mismatch).
//!
//! Every chunk is looked up (one HEAD each); a chunk whose object changed since it was last
//! verified here, or that was never verified, is read and verified too. Verified versions are
//! remembered in a bounded LRU, so a NAR served before costs only the lookups, and a NAR
//! checked in the last 30 seconds is not looked over again. The bytes sent
//! are verified again as they stream, so an object changed in place after the check still never
//! reaches a client unverified: the stream is cut instead.
//!
//! The same LRU keeps the BLAKE3 digest of each verified frame (of its compressed bytes). A
//! frame read again is checked against it at BLAKE3 speed over a third of the bytes, instead
//! of being decompressed and hashed: this is what lets `.nar.zst` and the chunk API send
//! stored frames without decompressing them. Frames this process wrote (ingest, the chunk
//! API) are remembered as they are written, so the first download after an upload skips the
//! preflight's reads too. The memory is per process: after a restart, or on another replica,
//! each frame is decompressed and verified once more before its digest counts.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_core::chunk::pack::PackId;
use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use lru::LruCache;
use parking_lot::Mutex;

use crate::storage::Storage;

/// Chunk frames remembered as verified; about 130 bytes each.
const REMEMBERED: usize = 200_000;

/// NARs remembered as checked.
const REMEMBERED_NARS: usize = 4096;

/// Pack frames remembered as verified: 64 GiB of NAR in frames of the default 4 MiB.
const REMEMBERED_PACK_FRAMES: usize = 16_384;

/// Chunk versions asked for in one thread hop from a store that works in the calling thread.
const LOOKUP_BATCH: usize = 256;

/// How long a NAR that passed the check is served without checking it again.
const NAR_CHECK_FRESH: Duration = Duration::from_secs(30);

/// What is known of a chunk's stored frame that verified.
struct KnownFrame {
    /// The object's version token when it was read or written (see [`Storage::chunk_version`]),
    /// when the store gave one.
    version: Option<String>,
    /// BLAKE3 of the frame's compressed bytes: a frame that hashes to it is the one that
    /// verified, whatever the object's version says.
    digest: blake3::Hash,
}

/// The chunk frames, pack frames and NARs verified lately.
pub struct VerifiedChunks {
    seen: Mutex<LruCache<ChunkHash, KnownFrame>>,
    nars: Mutex<LruCache<Sha256Hash, Instant>>,
    /// BLAKE3 of each pack frame (by pack and offset) whose chunks all verified, of its
    /// compressed bytes, as for chunk frames.
    pack_frames: Mutex<LruCache<(PackId, u64), blake3::Hash>>,
}

impl Default for VerifiedChunks {
    fn default() -> Self {
        let capacity = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        VerifiedChunks {
            seen: Mutex::new(LruCache::new(capacity(REMEMBERED))),
            nars: Mutex::new(LruCache::new(capacity(REMEMBERED_NARS))),
            pack_frames: Mutex::new(LruCache::new(capacity(REMEMBERED_PACK_FRAMES))),
        }
    }
}

impl VerifiedChunks {
    /// Fails with [`flywheel_core::ErrorKind::Corrupt`] naming the first chunk of `refs` that is
    /// missing or does not verify.
    pub async fn check(
        self: &Arc<Self>,
        storage: &Storage,
        nar_hash: &Sha256Hash,
        refs: &[ChunkRef],
        parallelism: usize,
    ) -> Result<()> {
        // A NAR checked a moment ago (a fleet of runners pulling one closure) is not looked
        // over again: its bytes are still verified as they stream.
        if self.nars.lock().get(nar_hash).is_some_and(|at| at.elapsed() < NAR_CHECK_FRESH) {
            return Ok(());
        }
        self.check_chunks(storage, refs, parallelism).await?;
        self.nars.lock().put(*nar_hash, Instant::now());
        Ok(())
    }

    /// Looks over every chunk of `refs`, as [`VerifiedChunks::check`] describes.
    async fn check_chunks(self: &Arc<Self>, storage: &Storage, refs: &[ChunkRef], parallelism: usize) -> Result<()> {
        // A store that works in the calling thread is asked for a batch of versions per
        // thread hop; any other for each chunk at once.
        let batch = if storage.reads_in_batches() { LOOKUP_BATCH } else { 1 };
        futures::stream::iter(refs.chunks(batch).map(<[ChunkRef]>::to_vec))
            .map(|batch| {
                let verified = self.clone();
                let storage = storage.clone();
                let task = tokio::spawn(async move { verified.check_batch(&storage, batch).await });
                async move { task.await.map_err(|e| Error::internal(format!("chunk check failed: {e}")))? }
            })
            .buffer_unordered(parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn check_batch(&self, storage: &Storage, batch: Vec<ChunkRef>) -> Result<()> {
        let versions = storage.chunk_versions(batch.iter().map(|c| c.hash).collect()).await?;
        let mut unknown = Vec::new();
        for (chunk_ref, version) in batch.into_iter().zip(versions) {
            let Some(version) = version else {
                return Err(Error::corrupt(format!("chunk {} is missing from storage", chunk_ref.hash)));
            };
            if self.seen.lock().get(&chunk_ref.hash).is_none_or(|known| known.version.as_deref() != Some(version.as_str())) {
                unknown.push(chunk_ref);
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        // A few frames in memory at a time: after a restart every chunk is read here.
        for group in unknown.chunks(4) {
            let frames = storage.get_chunks_versioned(group.iter().map(|c| c.hash).collect()).await;
            for (chunk_ref, read) in group.iter().zip(frames) {
                let (frame, version) = read?;
                chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize)?;
                self.remember_read(chunk_ref.hash, version, &frame);
            }
        }
        Ok(())
    }

    /// Records `frame` as the verified frame of `hash`, stored as `version` when known. The
    /// caller must have verified it (or made it from bytes it hashed itself).
    pub fn remember(&self, hash: ChunkHash, version: Option<String>, frame: &[u8]) {
        let digest = blake3::hash(frame);
        self.seen.lock().put(hash, KnownFrame { version, digest });
    }

    /// Records `frame` as [`VerifiedChunks::remember`] does, unless this version of `hash` is
    /// remembered already (which spares hashing a frame read and verified again).
    pub fn remember_read(&self, hash: ChunkHash, version: String, frame: &[u8]) {
        if self.seen.lock().peek(&hash).is_some_and(|known| known.version.as_deref() == Some(version.as_str())) {
            return;
        }
        self.remember(hash, Some(version), frame);
    }

    /// Records `frame`, the compressed bytes at `offset` of `pack`, as a pack frame whose
    /// chunks the caller verified, all of them.
    pub fn remember_pack_frame(&self, pack: PackId, offset: u64, frame: &[u8]) {
        let digest = blake3::hash(frame);
        self.pack_frames.lock().put((pack, offset), digest);
    }

    /// Whether `frame` is, byte for byte, the frame at `offset` of `pack` that verified before.
    pub fn is_known_pack_frame(&self, pack: PackId, offset: u64, frame: &[u8]) -> bool {
        let Some(expected) = self.pack_frames.lock().get(&(pack, offset)).copied() else {
            return false;
        };
        blake3::hash(frame) == expected
    }

    /// Whether `frame` is, byte for byte, a frame of `hash` that verified before.
    pub fn is_known_frame(&self, hash: &ChunkHash, frame: &[u8]) -> bool {
        let Some(expected) = self.seen.lock().get(hash).map(|known| known.digest) else {
            return false;
        };
        // `blake3::Hash` compares in constant time; the hash runs outside the lock.
        blake3::hash(frame) == expected
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use bytes::Bytes;

    use super::*;
    use crate::chunk_reader::ChunkReader;
    use crate::metrics::Metrics;

    struct Fixture {
        storage: Storage,
        verified: Arc<VerifiedChunks>,
        metrics: Arc<Metrics>,
        chunk: ChunkRef,
    }

    impl Fixture {
        async fn new() -> Self {
            let storage = Storage::new(Arc::new(object_store::memory::InMemory::new()));
            let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let chunk = ChunkRef { hash: ChunkHash::of(&data), size: data.len() as u32 };
            let fixture = Fixture { storage, verified: Arc::default(), metrics: Arc::default(), chunk };
            fixture.store(&chunk::compress(&data, 3).unwrap(), true).await;
            fixture
        }

        /// Stores `frame` as the chunk's object, remembered as written when `remember` says so.
        async fn store(&self, frame: &[u8], remember: bool) {
            let version = self.storage.put_chunk(&self.chunk.hash, Bytes::copy_from_slice(frame)).await.unwrap();
            if remember {
                self.verified.remember(self.chunk.hash, version, frame);
            }
        }

        async fn send(&self) -> Result<Vec<Bytes>> {
            let reader = ChunkReader {
                storage: self.storage.clone(),
                parallelism: 4,
                reads: Arc::new(tokio::sync::Semaphore::new(4)),
                metrics: self.metrics.clone(),
                verified: self.verified.clone(),
            };
            reader.frames(vec![self.chunk]).try_collect().await
        }

        fn sent_by_digest(&self) -> u64 {
            self.metrics.frames_known.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn a_written_frame_is_sent_by_its_digest_without_decompressing() {
        let fixture = Fixture::new().await;
        let sent = fixture.send().await.unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(fixture.sent_by_digest(), 1);
        assert_eq!(chunk::decompress_verified(&sent[0], &fixture.chunk.hash, fixture.chunk.size as usize).unwrap().len(), 200_000);
        // The preflight trusts the version the write answered with: no read needed.
        fixture.verified.check(&fixture.storage, &Sha256Hash([1; 32]), &[fixture.chunk], 2).await.unwrap();
    }

    #[tokio::test]
    async fn another_valid_frame_is_verified_by_decompressing_then_known() {
        let fixture = Fixture::new().await;
        let data = chunk::decompress_verified(&fixture.send().await.unwrap()[0], &fixture.chunk.hash, 200_000).unwrap();
        // The same chunk compressed otherwise (a repack, another replica's write).
        let other = chunk::compress(&data, 19).unwrap();
        fixture.store(&other, false).await;
        assert_eq!(fixture.send().await.unwrap(), vec![Bytes::from(other.clone())]);
        assert_eq!(fixture.sent_by_digest(), 1, "an unknown frame went out unchecked");
        assert_eq!(fixture.send().await.unwrap(), vec![Bytes::from(other)]);
        assert_eq!(fixture.sent_by_digest(), 2, "the frame that verified is not known by its digest");
    }

    #[tokio::test]
    async fn a_frame_changed_in_place_is_never_sent() {
        let fixture = Fixture::new().await;
        fixture.send().await.unwrap();
        // A valid zstd frame of other bytes, in the chunk's place.
        fixture.store(&chunk::compress(&[7u8; 200_000], 3).unwrap(), false).await;
        let err = fixture.send().await.unwrap_err();
        assert_eq!(err.kind(), flywheel_core::ErrorKind::Corrupt);
        let err = fixture.verified.check(&fixture.storage, &Sha256Hash([2; 32]), &[fixture.chunk], 2).await.unwrap_err();
        assert_eq!(err.kind(), flywheel_core::ErrorKind::Corrupt);
        assert_eq!(fixture.sent_by_digest(), 1);
    }

    /// Storage that reads in batches (as the server has local and in-memory stores): a NAR of
    /// more chunks than a batch comes out whole and in order, and a damaged chunk in the middle
    /// is an error in its place and fails the preflight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_reads_come_in_order_and_stop_at_damage() {
        let storage = Storage::new(Arc::new(object_store::memory::InMemory::new())).with_inline_io(2).unwrap();
        assert!(storage.reads_in_batches());
        let verified: Arc<VerifiedChunks> = Arc::default();
        let mut refs = Vec::new();
        for i in 0..50u32 {
            let data: Vec<u8> = (0..3000 + i).map(|j| (j.wrapping_mul(i + 7) >> 3) as u8).collect();
            let chunk_ref = ChunkRef { hash: ChunkHash::of(&data), size: data.len() as u32 };
            let frame = chunk::compress(&data, 3).unwrap();
            let version = storage.put_chunk(&chunk_ref.hash, Bytes::from(frame.clone())).await.unwrap();
            // Half are known as written; the others are verified by decompressing.
            if i % 2 == 0 {
                verified.remember(chunk_ref.hash, version, &frame);
            }
            refs.push(chunk_ref);
        }
        let metrics: Arc<Metrics> = Arc::default();
        let reader = ChunkReader { storage: storage.clone(), parallelism: 8, reads: Arc::new(tokio::sync::Semaphore::new(8)), metrics, verified: verified.clone() };
        verified.check(&storage, &Sha256Hash([3; 32]), &refs, 4).await.unwrap();
        let chunks: Vec<Bytes> = reader.chunks(refs.clone()).try_collect().await.unwrap();
        assert_eq!(chunks.len(), refs.len());
        for (chunk_ref, data) in refs.iter().zip(&chunks) {
            assert_eq!(ChunkHash::of(data), chunk_ref.hash, "chunks out of order");
        }

        // Chunk 30 replaced by a valid frame of other bytes.
        storage.put_chunk(&refs[30].hash, Bytes::from(chunk::compress(&[9u8; 3030], 3).unwrap())).await.unwrap();
        let items: Vec<Result<Bytes>> = reader.frames(refs.clone()).collect().await;
        let good = items.iter().take_while(|item| item.is_ok()).count();
        // (A consumer stops at the first error: a body stream is cut there.)
        assert_eq!(good, 30, "the chunks before the damaged one come out");
        assert_eq!(items[30].as_ref().unwrap_err().kind(), flywheel_core::ErrorKind::Corrupt);
        let err = verified.check(&storage, &Sha256Hash([4; 32]), &refs, 4).await.unwrap_err();
        assert_eq!(err.kind(), flywheel_core::ErrorKind::Corrupt);

        // Chunk 30 repaired, chunk 41 gone from storage (the second of its batch of four): the
        // chunks before it come out, chunk 40 included, then the error in its place.
        let data: Vec<u8> = (0..3030u32).map(|j| (j.wrapping_mul(37) >> 3) as u8).collect();
        storage.put_chunk(&refs[30].hash, Bytes::from(chunk::compress(&data, 3).unwrap())).await.unwrap();
        storage.delete_chunk(&refs[41].hash).await.unwrap();
        let items: Vec<Result<Bytes>> = reader.frames(refs.clone()).collect().await;
        let good = items.iter().take_while(|item| item.is_ok()).count();
        assert_eq!(good, 41, "the chunks before the missing one come out");
        let err = items[41].as_ref().unwrap_err();
        assert!(err.kind() == flywheel_core::ErrorKind::Corrupt && err.to_string().contains("missing"), "{err}");
        let err = verified.check(&storage, &Sha256Hash([5; 32]), &refs, 4).await.unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
