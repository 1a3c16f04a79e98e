//! Reading stored chunks back for downloads, each verified: NARs in every compression, the
//! chunk API's frames and Bazel blobs. Chunks are read `parallelism` ahead of the consumer,
//! in batches from a store that works in the calling thread; a packed chunk comes out of its
//! pack (see [`flywheel_core::chunk::pack`]), and whole pack frames go out as they are where
//! a `.nar.zst` allows it.

use std::sync::Arc;

use bytes::Bytes;
use flywheel_core::chunk::pack::{self, PackPointer};
use flywheel_core::chunk;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::{Error, Result};
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::preflight::VerifiedChunks;
use crate::storage::Storage;

/// Reads stored chunks back, each verified, `parallelism` ahead of the consumer and within a
/// shared bound on reads in flight.
#[derive(Clone)]
pub struct ChunkReader {
    /// Where the chunks are.
    pub storage: Storage,
    /// Chunks fetched ahead of the one being consumed.
    pub parallelism: usize,
    /// Reads in flight against storage, shared with other readers.
    pub reads: Arc<Semaphore>,
    /// Counts fetches.
    pub metrics: Arc<Metrics>,
    /// Frames known to verify (see [`VerifiedChunks`]).
    pub verified: Arc<VerifiedChunks>,
}

impl ChunkReader {
    /// The bytes of the chunks of `refs` in order, a piece per chunk, each verified. A size no
    /// chunk can have (the sizes may come from a request) fails as invalid input before
    /// storage is asked or memory taken.
    pub fn chunks(&self, refs: Vec<ChunkRef>) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        self.read(refs, Output::Data)
    }

    /// A zstd frame for each chunk of `refs`, in order, as [`ChunkReader::chunks`] reads them.
    /// A stored frame whose digest matches one that verified before is passed on without being
    /// decompressed; any other is decompressed and verified. A packed chunk goes out in a frame
    /// of raw blocks (see [`pack::stored_frame`]).
    pub fn frames(&self, refs: Vec<ChunkRef>) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        self.read(refs, Output::Frames)
    }

    /// The NAR that `refs` make up as zstd frames, for a `.nar.zst`: read as
    /// [`ChunkReader::frames`] reads them, except that packed chunks which make up a whole
    /// pack frame, in order (compaction packs chunks in NAR order), go out as that frame,
    /// compressed as it is stored. Its chunks are verified the first time, after which the
    /// frame is known by its digest.
    pub fn nar_frames(&self, refs: Vec<ChunkRef>) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        self.read(refs, Output::NarFrames)
    }

    fn read(&self, refs: Vec<ChunkRef>, output: Output) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let reader = self.clone();
        group_by_pack_frame(self.fetch(refs, output))
            .map(move |unit| match unit {
                Ok(Unit::Loose(piece)) => futures::future::Either::Left(futures::future::ready(vec![Ok(piece)])),
                Err(err) => futures::future::Either::Left(futures::future::ready(vec![Err(err)])),
                Ok(Unit::PackFrame(group)) => {
                    // Decompressing and hashing a frame of up to 16 MiB: a task of its own.
                    let task = tokio::spawn(reader.clone().pack_group(group, output));
                    futures::future::Either::Right(async move {
                        task.await.unwrap_or_else(|e| vec![Err(Error::internal(format!("pack frame task failed: {e}")))])
                    })
                }
            })
            .buffered(PACK_FRAMES_AHEAD)
            .flat_map(futures::stream::iter)
    }

    fn fetch(&self, refs: Vec<ChunkRef>, output: Output) -> impl Stream<Item = Result<ChunkRead>> + Send + 'static {
        // A store that works in the calling thread reads a batch of chunks per thread hop;
        // any other is asked for each chunk at once. Either way about `parallelism` chunks
        // are read ahead (at least two batches, so that one is read while one is sent).
        let (batch, batches_ahead) = match self.storage.reads_in_batches() {
            true => {
                let batch = (self.parallelism / 2).clamp(1, READ_BATCH);
                (batch, self.parallelism.div_ceil(batch).max(2))
            }
            false => (1, self.parallelism),
        };
        let batches: Vec<Vec<ChunkRef>> = refs.chunks(batch).map(<[ChunkRef]>::to_vec).collect();
        let reader = self.clone();
        futures::stream::iter(batches)
            .map(move |batch| {
                // A task per batch spreads verification over the worker threads; the work is
                // short enough not to need the blocking pool.
                let task = tokio::spawn(reader.clone().read_batch(batch, output));
                async move {
                    match task.await {
                        Ok(items) => items,
                        Err(e) => vec![Err(Error::internal(format!("chunk task failed: {e}")))],
                    }
                }
            })
            .buffered(batches_ahead)
            .flat_map(futures::stream::iter)
    }

    /// Reads `batch`'s objects and verifies the stored frames among them; the items stop at the
    /// first that fails.
    async fn read_batch(self, batch: Vec<ChunkRef>, output: Output) -> Vec<Result<ChunkRead>> {
        if let Err(err) = batch.iter().try_for_each(|chunk_ref| chunk::check_chunk_len(u64::from(chunk_ref.size))) {
            return vec![Err(err)];
        }
        // Never closed, so this only waits.
        let permit = self.reads.acquire().await.ok();
        let started = std::time::Instant::now();
        let reads = self.storage.get_chunk_objects(batch.iter().map(|c| c.hash).collect()).await;
        drop(permit);
        let mut items = Vec::with_capacity(batch.len());
        for (i, (chunk_ref, read)) in batch.iter().zip(reads).enumerate() {
            if i > 0 {
                // Verifying a batch takes up to a millisecond: let other tasks in between chunks.
                tokio::task::yield_now().await;
            }
            let item = read.and_then(|(object, version)| self.verify(chunk_ref, object, version, output));
            let failed = item.is_err();
            items.push(item);
            if failed {
                break;
            }
        }
        // One read for the batch: each chunk that came out counts its share of the time.
        let fetched = items.iter().filter(|item| item.is_ok()).count();
        let per_chunk = started.elapsed() / batch.len().max(1) as u32;
        for _ in 0..fetched {
            self.metrics.chunk_fetch_seconds.observe(per_chunk);
        }
        self.metrics.chunks_fetched.fetch_add(fetched as u64, std::sync::atomic::Ordering::Relaxed);
        items
    }

    /// A chunk object as [`ChunkReader::fetch`] yields it: a pack pointer as it is; a stored
    /// frame known by its digest as it is when frames are wanted; any other frame decompressed
    /// and verified.
    fn verify(&self, chunk_ref: &ChunkRef, object: Bytes, version: String, output: Output) -> Result<ChunkRead> {
        if let Some(pointer) = PackPointer::parse(&object).map_err(|err| err.context(format_args!("chunk {}", chunk_ref.hash)))? {
            return Ok(ChunkRead::Packed(*chunk_ref, pointer));
        }
        if output != Output::Data && self.verified.is_known_frame(&chunk_ref.hash, &object) {
            self.metrics.frames_known.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(ChunkRead::Loose(object));
        }
        let data = chunk::decompress_verified(&object, &chunk_ref.hash, chunk_ref.size as usize)?;
        self.verified.remember_read(chunk_ref.hash, version, &object);
        Ok(ChunkRead::Loose(if output == Output::Data { Bytes::from(data) } else { object }))
    }

    /// The pieces that send `group` (packed chunks of one pack frame, in order). When they make
    /// up the frame whole, it is read and its chunks verified once, after which the frame is
    /// known by its digest; a `.nar.zst` then gets the frame as it is stored. Else the frame is
    /// decompressed once for all of them, kept in memory a while, and each chunk verified. The
    /// items stop at the first that fails.
    async fn pack_group(self, group: Vec<(ChunkRef, PackPointer)>, output: Output) -> Vec<Result<Bytes>> {
        let Some(&(_, first)) = group.first() else { return Vec::new() };
        let piece = |data: Bytes| match output {
            Output::Data => data,
            Output::Frames | Output::NarFrames => Bytes::from(pack::stored_frame(&data)),
        };
        if makes_whole_frame(&group) {
            match self.whole_frame(&group, &first, output != Output::NarFrames).await {
                Ok(Some((frame, None))) => {
                    self.metrics.pack_frames_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return vec![Ok(frame)];
                }
                Ok(Some((_, Some(raw)))) => {
                    let slice = |pointer: &PackPointer| raw.slice(pointer.offset as usize..(pointer.offset + pointer.len) as usize);
                    return group.iter().map(|(_, pointer)| Ok(piece(slice(pointer)))).collect();
                }
                Err(err) => return vec![Err(err)],
                // The pack is gone (compaction moved these chunks): each is read anew below.
                Ok(None) => {}
            }
        }
        let raw = match self.storage.pack_frame_raw(&first).await {
            Ok(raw) => raw,
            Err(err) => return vec![Err(err.context(format_args!("chunk {}", group[0].0.hash)))],
        };
        let mut pieces = Vec::with_capacity(group.len());
        for (chunk_ref, pointer) in &group {
            let data = match &raw {
                Some(raw) => pointer.slice_verified(raw, &chunk_ref.hash).map(Bytes::copy_from_slice),
                None => self.reread(chunk_ref).await,
            };
            let failed = data.is_err();
            pieces.push(data.map(piece));
            if failed {
                break;
            }
        }
        pieces
    }

    /// The pack frame that `group` makes up whole: its stored bytes, and its uncompressed bytes
    /// when `want_raw` or when its chunks had to be verified (the first time); `None` when the
    /// pack is gone.
    async fn whole_frame(
        &self,
        group: &[(ChunkRef, PackPointer)],
        first: &PackPointer,
        want_raw: bool,
    ) -> Result<Option<(Bytes, Option<Bytes>)>> {
        let Some(frame) = self.storage.get_pack_frame(first).await? else { return Ok(None) };
        let known = self.verified.is_known_pack_frame(first.pack, first.frame_offset, &frame);
        if known && !want_raw {
            return Ok(Some((frame, None)));
        }
        let (stored, group, raw_len) = (frame.clone(), group.to_vec(), first.frame_raw_len as usize);
        // Decompressing and hashing up to 16 MiB: off the runtime's threads.
        let raw = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let raw = pack::decompress_frame(&stored, raw_len)?;
            if !known {
                group.iter().try_for_each(|(chunk_ref, pointer)| pointer.slice_verified(&raw, &chunk_ref.hash).map(drop))?;
            }
            Ok(raw)
        })
        .await
        .map_err(|e| Error::internal(format!("pack frame check failed: {e}")))?
        .map_err(|err| err.context(format_args!("pack {} at {}", first.pack, first.frame_offset)))?;
        if !known {
            self.verified.remember_pack_frame(first.pack, first.frame_offset, &frame);
        }
        Ok(Some((frame, want_raw.then(|| Bytes::from(raw)))))
    }

    /// A packed chunk's bytes read again by its name, verified: its pointer may have moved.
    async fn reread(&self, chunk_ref: &ChunkRef) -> Result<Bytes> {
        let (frame, _) = self.storage.get_chunk_versioned(&chunk_ref.hash).await?;
        chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize).map(Bytes::from)
    }
}

/// What a [`ChunkReader`] sends on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Each chunk's bytes.
    Data,
    /// A zstd frame for each chunk.
    Frames,
    /// zstd frames that make up the NAR: whole pack frames where they can go.
    NarFrames,
}

/// A chunk as [`ChunkReader::fetch`] read it.
enum ChunkRead {
    /// A stored frame, verified, as the output wants it: its bytes or the frame.
    Loose(Bytes),
    /// A packed chunk's pointer, not yet followed.
    Packed(ChunkRef, PackPointer),
}

/// What [`ChunkReader::read`] resolves in order: a loose chunk ready to go, or neighbouring
/// packed chunks of one pack frame.
enum Unit {
    Loose(Bytes),
    PackFrame(Vec<(ChunkRef, PackPointer)>),
}

/// Pack frames read (and verified) ahead of the one going out: each is up to 16 MiB, so few.
const PACK_FRAMES_AHEAD: usize = 4;

/// Chunks of one pack frame taken together, at most: a frame of 16 MiB holds no more chunks of
/// the minimum size than this.
const PACK_GROUP_MAX: usize = 4096;

/// Reads in order, with neighbouring packed chunks of the same pack frame grouped; a group
/// ends when it makes up its whole frame.
fn group_by_pack_frame(
    reads: impl Stream<Item = Result<ChunkRead>> + Send + 'static,
) -> impl Stream<Item = Result<Unit>> + Send + 'static {
    let reads = Box::pin(reads.fuse());
    futures::stream::unfold((reads, None::<Result<ChunkRead>>), |(mut reads, held)| async move {
        let item = match held {
            Some(item) => item,
            None => reads.next().await?,
        };
        let (chunk_ref, pointer) = match item {
            Err(err) => return Some((Err(err), (reads, None))),
            Ok(ChunkRead::Loose(piece)) => return Some((Ok(Unit::Loose(piece)), (reads, None))),
            Ok(ChunkRead::Packed(chunk_ref, pointer)) => (chunk_ref, pointer),
        };
        let mut group = vec![(chunk_ref, pointer)];
        let mut held = None;
        while group.len() < PACK_GROUP_MAX && !makes_whole_frame(&group) {
            match reads.next().await {
                Some(Ok(ChunkRead::Packed(next_ref, next)))
                    if next.pack == pointer.pack && next.frame_offset == pointer.frame_offset =>
                {
                    group.push((next_ref, next))
                }
                other => {
                    held = other;
                    break;
                }
            }
        }
        Some((Ok(Unit::PackFrame(group)), (reads, held)))
    })
}

/// Whether `group`'s chunks are, in order and with nothing between them, all of their frame's
/// bytes: then the frame decompresses to exactly these chunks.
fn makes_whole_frame(group: &[(ChunkRef, PackPointer)]) -> bool {
    let mut end = 0u64;
    for (_, pointer) in group {
        if u64::from(pointer.offset) != end {
            return false;
        }
        end += u64::from(pointer.len);
    }
    end == group.first().map_or(0, |(_, pointer)| u64::from(pointer.frame_raw_len))
}

/// Chunks read in one thread hop from a store that works in the calling thread: enough to
/// make the hop's cost small beside the reads, few enough that the first bytes of a stream
/// are not held back (16 chunks are about 1 MiB of NAR).
const READ_BATCH: usize = 16;

/// `stream` once its first item is in, so that a failure there (a first chunk missing from
/// storage) is an error answer before the status line rather than a 200 cut short.
pub async fn first_item_in<T: Send + 'static>(
    stream: impl Stream<Item = Result<T>> + Send + 'static,
) -> Result<impl Stream<Item = Result<T>> + Send + 'static> {
    let mut stream = Box::pin(stream);
    let first = stream.next().await.transpose()?;
    Ok(futures::stream::iter(first.map(Ok)).chain(stream))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use flywheel_core::chunk::pack::{PackBuilder, PackId};
    use flywheel_core::chunk::ChunkHash;
    use futures::TryStreamExt;

    use super::*;

    /// Compressible bytes, different for each `seed`.
    fn data(seed: u32, len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| b"abcdefgh"[((i / 7) ^ seed) as usize % 8]).collect()
    }

    struct Fixture {
        reader: ChunkReader,
        /// In NAR order: two chunks making up a pack frame, one chunk of the next frame,
        /// a loose chunk, then the two chunks of the last frame.
        refs: Vec<ChunkRef>,
        nar: Vec<u8>,
        pack: (PackId, Vec<u8>),
    }

    impl Fixture {
        async fn new() -> Self {
            let storage = Storage::new(Arc::new(object_store::memory::InMemory::new()));
            let chunks: Vec<Vec<u8>> = (0..7).map(|seed| data(seed, 20_000)).collect();
            let refs_of = |i: usize| ChunkRef { hash: ChunkHash::of(&chunks[i]), size: chunks[i].len() as u32 };
            // Frames close at 50 kB: [0, 1], [2, 3], [4, 5].
            let mut builder = PackBuilder::new(50_000, 3);
            for chunk in &chunks[..6] {
                builder.add(ChunkHash::of(chunk), chunk).unwrap();
            }
            let (bytes, id, index) = builder.finish().unwrap();
            assert_eq!(index.frames.len(), 3);
            storage.put_pack(&id, Bytes::from(bytes.clone())).await.unwrap();
            for entry in &index.chunks {
                storage.put_chunk_pointer(&entry.hash, &index.pointer(id, entry)).await.unwrap();
            }
            storage.put_chunk(&refs_of(6).hash, Bytes::from(chunk::compress(&chunks[6], 3).unwrap())).await.unwrap();
            let order = [0, 1, 2, 6, 4, 5];
            let reader = ChunkReader {
                storage,
                parallelism: 4,
                reads: Arc::new(Semaphore::new(4)),
                metrics: Arc::default(),
                verified: Arc::default(),
            };
            Fixture {
                reader,
                refs: order.iter().map(|&i| refs_of(i)).collect(),
                nar: order.iter().flat_map(|&i| chunks[i].clone()).collect(),
                pack: (id, bytes),
            }
        }

        async fn nar_zst(&self) -> Result<Vec<u8>> {
            let frames: Vec<Bytes> = self.reader.nar_frames(self.refs.clone()).try_collect().await?;
            Ok(frames.concat())
        }

        fn frames_sent_whole(&self) -> u64 {
            self.reader.metrics.pack_frames_sent.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn whole_pack_frames_go_out_as_stored_and_other_chunks_in_frames_of_their_own() {
        let fixture = Fixture::new().await;
        for round in 1..=2 {
            let sent = fixture.nar_zst().await.unwrap();
            assert_eq!(zstd::decode_all(&sent[..]).unwrap(), fixture.nar, "round {round}");
            // The first and last frames; the lone chunk of the middle one goes out alone.
            assert_eq!(fixture.frames_sent_whole(), 2 * round);
            assert!(sent.len() < fixture.nar.len() / 2, "{} bytes sent for {}", sent.len(), fixture.nar.len());
        }
    }

    #[tokio::test]
    async fn packed_chunks_come_out_one_by_one_as_bytes_or_frames() {
        let fixture = Fixture::new().await;
        let data: Vec<Bytes> = fixture.reader.chunks(fixture.refs.clone()).try_collect().await.unwrap();
        let frames: Vec<Bytes> = fixture.reader.frames(fixture.refs.clone()).try_collect().await.unwrap();
        assert_eq!((data.len(), frames.len()), (6, 6), "a piece per chunk");
        assert_eq!(data.concat(), fixture.nar);
        for ((chunk_ref, data), frame) in fixture.refs.iter().zip(&data).zip(&frames) {
            assert_eq!(ChunkHash::of(data), chunk_ref.hash);
            assert_eq!(chunk::decompress_verified(frame, &chunk_ref.hash, data.len()).unwrap(), &data[..]);
        }
        assert_eq!(fixture.frames_sent_whole(), 0, "only a .nar.zst sends pack frames whole");
    }

    #[tokio::test]
    async fn a_pack_frame_damaged_after_it_verified_is_never_sent() {
        let fixture = Fixture::new().await;
        fixture.nar_zst().await.unwrap();
        // Damage the last frame in place: it is known by its digest, which no longer matches.
        let (id, mut bytes) = fixture.pack.clone();
        let last = bytes.len() - 5;
        bytes[last] ^= 0x55;
        fixture.reader.storage.put_pack(&id, Bytes::from(bytes)).await.unwrap();
        let items: Vec<Result<Bytes>> = fixture.reader.nar_frames(fixture.refs.clone()).collect().await;
        let (last, good) = items.split_last().unwrap();
        assert!(last.is_err(), "the damaged frame fails");
        let good: Vec<u8> = good.iter().map(|item| item.as_ref().unwrap().to_vec()).collect::<Vec<_>>().concat();
        let sent = zstd::decode_all(&good[..]).unwrap();
        assert!(fixture.nar.starts_with(&sent) && sent.len() == 60_000 + 20_000, "only the frames before it go out");
        // The same for a `.nar`, whose frames are known by their digest too.
        let items: Vec<Result<Bytes>> = fixture.reader.chunks(fixture.refs.clone()).collect().await;
        let (last, good) = items.split_last().unwrap();
        assert!(last.is_err(), "the damaged frame fails");
        let good: Vec<u8> = good.iter().map(|item| item.as_ref().unwrap().to_vec()).collect::<Vec<_>>().concat();
        assert_eq!(good, fixture.nar[..80_000], "only the chunks before it go out");
    }
}
