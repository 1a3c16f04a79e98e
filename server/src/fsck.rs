//! Finding chunks that are missing or corrupt in storage, and taking the paths that need them
//! out of service so that an ordinary re-push repairs them.
//!
//! Every chunk referenced by a published path is read and verified once. A corrupt chunk object
//! is deleted (otherwise a re-push would find it "stored" and skip it); every path that needs a
//! missing or corrupt chunk loses its path record, so it reads as missing (narinfo 404, listed
//! by `get-missing-paths`) until it is pushed again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::{ErrorKind, Result};
use futures::{StreamExt, TryStreamExt};

use crate::storage::Storage;

/// What a check found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Published paths looked at.
    pub paths: usize,
    /// Distinct chunks read and verified.
    pub chunks_checked: usize,
    /// Chunks referenced but not stored.
    pub missing: BTreeSet<ChunkHash>,
    /// Chunks stored with content that does not match their name.
    pub corrupt: BTreeSet<ChunkHash>,
    /// Paths whose manifest is gone.
    pub missing_manifests: Vec<(String, String)>,
    /// `(cache, store path)` of every path that needs a missing or corrupt chunk or manifest.
    pub damaged_paths: Vec<(String, String)>,
    /// Whether the damaged paths were taken out of service and corrupt chunks deleted.
    pub repaired: bool,
}

/// Checks every published path of every cache; with `repair`, takes damaged paths out of
/// service and deletes corrupt chunks.
pub async fn fsck(storage: &Storage, parallelism: usize, repair: bool) -> Result<FsckReport> {
    let mut report = FsckReport::default();
    // Which paths use which chunks.
    let mut users: HashMap<ChunkHash, Vec<(String, String)>> = HashMap::new();
    let mut sizes: BTreeMap<ChunkHash, u32> = BTreeMap::new();
    for cache in storage.list_caches().await? {
        for hash_part in storage.list_paths(&cache).await? {
            let Some(record) = storage.get_path(&cache, &hash_part).await? else { continue };
            report.paths += 1;
            let Some(manifest) = storage.get_manifest(&record.nar_hash).await? else {
                report.missing_manifests.push((cache.clone(), record.store_path.clone()));
                report.damaged_paths.push((cache.clone(), record.store_path.clone()));
                continue;
            };
            for chunk_ref in &manifest.chunks {
                sizes.insert(chunk_ref.hash, chunk_ref.size);
                users.entry(chunk_ref.hash).or_default().push((cache.clone(), record.store_path.clone()));
            }
        }
    }
    report.chunks_checked = sizes.len();
    let verdicts: Vec<(ChunkHash, Option<ErrorKind>)> = futures::stream::iter(sizes)
        .map(|(hash, size)| {
            let storage = storage.clone();
            let task = tokio::spawn(async move {
                let verdict = match storage.get_chunk(&hash).await {
                    Ok(frame) => chunk::decompress_verified(&frame, &hash, size as usize).err().map(|e| e.kind()),
                    Err(err) => Some(err.kind()),
                };
                (hash, verdict)
            });
            async move { task.await.map_err(|e| flywheel_core::Error::internal(format!("fsck task failed: {e}"))) }
        })
        .buffer_unordered(parallelism)
        .try_collect()
        .await?;
    for (hash, verdict) in verdicts {
        match verdict {
            None => {}
            Some(ErrorKind::Corrupt) if storage.chunk_size(&hash).await?.is_none() => {
                report.missing.insert(hash);
            }
            Some(ErrorKind::Corrupt) => {
                report.corrupt.insert(hash);
            }
            // Storage that does not answer says nothing about the chunk: stop rather than
            // take healthy paths out of service.
            Some(kind) => {
                return Err(flywheel_core::Error::new(kind, format!("could not read chunk {hash}; fsck stopped")));
            }
        }
    }
    let damaged: BTreeSet<(String, String)> = report
        .missing
        .iter()
        .chain(&report.corrupt)
        .flat_map(|hash| users.get(hash).cloned().unwrap_or_default())
        .chain(report.damaged_paths.drain(..))
        .collect();
    report.damaged_paths = damaged.into_iter().collect();
    if repair {
        for (cache, store_path) in &report.damaged_paths {
            storage.delete_path(cache, &store_path[..32.min(store_path.len())]).await?;
        }
        for hash in &report.corrupt {
            storage.delete_chunk(hash).await?;
        }
        report.repaired = true;
    }
    Ok(report)
}
