//! Pass 2's other half: asking which chunks the server lacks and uploading them, batched, in
//! parallel, each request retried.

use super::nar_pass::compress_missing;
use super::*;
use crate::retry::RetryPolicy;

impl Pusher {
    /// Asks the server which of `ask` it lacks and uploads those; returns the name of the
    /// question, for a commit that follows (see [`by_query`]).
    pub(super) async fn upload_missing(
        &self,
        physical: &std::path::Path,
        chunks: &[ChunkRef],
        ask: &[ChunkHash],
        counters: &Counters,
    ) -> Result<Option<String>> {
        let (missing, query) = self.api.missing_chunks(ask).await?;
        let missing: HashSet<ChunkHash> = missing.into_iter().collect();
        if !missing.is_empty() {
            self.upload(physical, chunks, missing, counters).await?;
        }
        Ok(query)
    }

    /// Pass 2: makes the NAR again and uploads the chunks in `missing`, `jobs` at once.
    pub(super) async fn upload(
        &self,
        physical: &std::path::Path,
        chunks: &[ChunkRef],
        missing: HashSet<ChunkHash>,
        counters: &Counters,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<(ChunkHash, usize, Vec<u8>)>(self.config.jobs.max(UPLOAD_BATCH));
        // A push of a few new chunks (the common case: a new version of a path) waits for all
        // of them and sends one request; a bigger one sends whatever is ready, in parallel.
        let missing_bytes: u64 = {
            let mut seen = HashSet::new();
            chunks.iter().filter(|c| missing.contains(&c.hash) && seen.insert(c.hash)).map(|c| u64::from(c.size)).sum()
        };
        let one_request = missing.len() <= UPLOAD_BATCH && missing_bytes <= UPLOAD_BATCH_BYTES as u64;
        let physical = physical.to_path_buf();
        let expected: Vec<ChunkRef> = chunks.to_vec();
        let (params, level) = (self.config.chunking, self.config.zstd_level);
        let producer = tokio::task::spawn_blocking(move || compress_missing(&physical, params, level, &expected, missing, tx));
        // Chunks ready together go in one request: fewer requests, fewer headers.
        let batches: futures::stream::BoxStream<'_, Vec<(ChunkHash, usize, Vec<u8>)>> = if one_request {
            tokio_stream_from(rx).chunks(UPLOAD_BATCH).boxed()
        } else {
            tokio_stream_from(rx).ready_chunks(UPLOAD_BATCH).boxed()
        };
        let uploads = batches
            .flat_map(|ready| futures::stream::iter(split_by_bytes(ready, UPLOAD_BATCH_BYTES)))
            .map(|batch| async move {
                let frames: Vec<(ChunkHash, &[u8])> = batch.iter().map(|(hash, _, frame)| (*hash, frame.as_slice())).collect();
                RetryPolicy::REQUEST.run("uploading chunks", || self.api.put_chunks(&frames)).await?;
                for (_, raw, frame) in &batch {
                    counters.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
                    counters.uploaded_bytes.fetch_add(*raw as u64, Ordering::Relaxed);
                    counters.uploaded_frame_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.config.jobs.max(1))
            .try_collect::<()>();
        // An upload error drops the receiver, which stops the producer.
        let uploaded = uploads.await;
        let produced = producer.await.map_err(|e| Error::internal(format!("chunking task failed: {e}")))?;
        uploaded?;
        produced
    }
}

/// Most chunks in one upload request.
pub(super) const UPLOAD_BATCH: usize = 16;
/// Most frame bytes in one upload request, well under the server's 16 MiB request limit
/// whatever the chunk sizes.
pub(super) const UPLOAD_BATCH_BYTES: usize = 4 << 20;

/// Splits ready chunks into batches of at most `max_bytes` of frames (a single larger frame
/// goes alone).
pub(super) fn split_by_bytes(ready: Vec<(ChunkHash, usize, Vec<u8>)>, max_bytes: usize) -> Vec<Vec<(ChunkHash, usize, Vec<u8>)>> {
    let mut batches: Vec<Vec<(ChunkHash, usize, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for item in ready {
        if batches.is_empty() || bytes + item.2.len() > max_bytes {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += item.2.len();
        if let Some(batch) = batches.last_mut() {
            batch.push(item);
        }
    }
    batches
}

pub(super) fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_batches_stay_under_the_byte_limit() {
        let item = |len: usize| (ChunkHash::of(&len.to_le_bytes()), len, vec![0u8; len]);
        let batches = split_by_bytes(vec![item(3), item(4), item(2), item(9), item(1)], 8);
        let sizes: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|(_, raw, _)| *raw).collect()).collect();
        assert_eq!(sizes, vec![vec![3, 4], vec![2], vec![9], vec![1]]);
        assert!(split_by_bytes(Vec::new(), 8).is_empty());
    }
}
