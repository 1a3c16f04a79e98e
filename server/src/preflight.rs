//! Checking a NAR's chunks before its first byte goes out, so that a missing or corrupt chunk
//! is a 5xx rather than a 200 cut short (which Attic serves, and Nix reports as a hash mismatch).
//!
//! Every chunk is looked up (one HEAD each); a chunk whose object changed since it was last
//! verified here, or that was never verified, is read and verified too. Verified versions are
//! remembered in a bounded LRU, so a NAR served before costs only the lookups, and a NAR
//! checked in the last 30 seconds is not looked over again. The bytes sent
//! are verified again as they stream, so an object changed in place after the check still never
//! reaches a client unverified: the stream is cut instead.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::Sha256Hash;
use flywheel_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use lru::LruCache;
use parking_lot::Mutex;

use crate::storage::Storage;

/// Chunk versions remembered as verified; about 100 bytes each.
const REMEMBERED: usize = 200_000;

/// NARs remembered as checked.
const REMEMBERED_NARS: usize = 4096;

/// How long a NAR that passed the check is served without checking it again.
const NAR_CHECK_FRESH: Duration = Duration::from_secs(30);

/// The chunk versions and NARs verified lately.
pub struct VerifiedChunks {
    seen: Mutex<LruCache<ChunkHash, String>>,
    nars: Mutex<LruCache<Sha256Hash, Instant>>,
}

impl Default for VerifiedChunks {
    fn default() -> Self {
        let capacity = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        VerifiedChunks {
            seen: Mutex::new(LruCache::new(capacity(REMEMBERED))),
            nars: Mutex::new(LruCache::new(capacity(REMEMBERED_NARS))),
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
        futures::stream::iter(refs.iter().copied())
            .map(|chunk_ref| {
                let verified = self.clone();
                let storage = storage.clone();
                let task = tokio::spawn(async move { verified.check_one(&storage, chunk_ref).await });
                async move { task.await.map_err(|e| Error::internal(format!("chunk check failed: {e}")))? }
            })
            .buffer_unordered(parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn check_one(&self, storage: &Storage, chunk_ref: ChunkRef) -> Result<()> {
        let Some(version) = storage.chunk_version(&chunk_ref.hash).await? else {
            return Err(Error::corrupt(format!("chunk {} is missing from storage", chunk_ref.hash)));
        };
        if self.seen.lock().get(&chunk_ref.hash) == Some(&version) {
            return Ok(());
        }
        let (frame, version) = storage.get_chunk_versioned(&chunk_ref.hash).await?;
        chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize)?;
        self.seen.lock().put(chunk_ref.hash, version);
        Ok(())
    }
}
