//! Finding chunks that are missing or corrupt in storage, and taking the paths (and Bazel
//! blobs) that need them out of service so that an ordinary re-push repairs them.
//!
//! Every chunk referenced by a published path or a Bazel blob record is read and verified
//! once; a Bazel blob kept inline in its record is checked against its SHA-256. A corrupt chunk object
//! is deleted (otherwise a re-push would find it "stored" and skip it); every path that needs a
//! missing or corrupt chunk loses its path record, so it reads as missing (narinfo 404, listed
//! by `get-missing-paths`) until it is pushed again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use flywheel_core::chunk::{self, ChunkHash};
use flywheel_core::{ErrorKind, Result};
use futures::StreamExt;

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
    /// Packs looked over.
    pub packs_checked: usize,
    /// Packs that are missing (a chunk points into them) or whose bytes do not match their
    /// name, index or chunks. With `repair`, the pointers of their chunks that do not verify
    /// are deleted like any corrupt chunk, so a re-push stores those chunks again; garbage
    /// collection deletes such a pack once nothing points into it.
    pub damaged_packs: BTreeSet<ChunkHash>,
    /// Paths whose manifest is gone.
    pub missing_manifests: Vec<(String, String)>,
    /// `(cache, store path)` of paths whose stored manifest does not parse (or is not
    /// consistent): the server cannot serve them.
    pub unreadable_manifests: Vec<(String, String)>,
    /// `(cache, hash part)` of path records that do not parse.
    pub unreadable_paths: Vec<(String, String)>,
    /// `(cache, store path)` of every path that needs a missing or corrupt chunk or manifest,
    /// or whose record or manifest does not parse (named by its hash part then).
    pub damaged_paths: Vec<(String, String)>,
    /// Bazel blob records looked at.
    pub blobs: usize,
    /// `(cache, sha256)` of Bazel blobs whose record does not decode, whose inline content
    /// does not hash to its name, or that need a missing or corrupt chunk.
    pub damaged_blobs: Vec<(String, String)>,
    /// Objects that could not be read for another reason than damage (storage that did not
    /// answer, say), and actions that failed, each naming its object. Nothing is concluded
    /// from them: the paths involved are left as they are.
    pub problems: Vec<String>,
    /// Whether the damaged paths were taken out of service and corrupt chunks deleted.
    pub repaired: bool,
}

impl FsckReport {
    fn problem(&mut self, message: String) {
        tracing::warn!(problem = %message, "fsck carries on past a problem");
        self.problems.push(message);
    }
}

/// Checks every published path of every cache; with `repair`, takes damaged paths out of
/// service and deletes corrupt chunks.
///
/// A bad object never stops the check. Damage (an object that is missing, does not parse or
/// does not verify) is reported and, with `repair`, repaired; any other failure to read (a
/// storage error) is named in [`FsckReport::problems`] and changes nothing, since it says
/// nothing about the object.
pub async fn fsck(storage: &Storage, parallelism: usize, repair: bool) -> Result<FsckReport> {
    let mut report = FsckReport::default();
    // Which paths use which chunks.
    let mut users: HashMap<ChunkHash, Vec<(String, String)>> = HashMap::new();
    let mut sizes: BTreeMap<ChunkHash, u32> = BTreeMap::new();
    let mut damaged: BTreeSet<(String, String)> = BTreeSet::new();
    // The same for Bazel blobs, by (cache, sha256 hex).
    let mut blob_users: HashMap<ChunkHash, Vec<(String, String)>> = HashMap::new();
    let mut damaged_blobs: BTreeSet<(String, String)> = BTreeSet::new();
    for cache in storage.list_caches().await? {
        let hash_parts = match storage.list_paths(&cache).await {
            Ok(hash_parts) => hash_parts,
            Err(err) => {
                report.problem(format!("cache {cache}: paths could not be listed: {err}"));
                continue;
            }
        };
        for hash_part in hash_parts {
            let record = match storage.get_path(&cache, &hash_part).await {
                Ok(Some(record)) => record,
                Ok(None) => continue,
                Err(err) if damage(err.kind()) => {
                    report.paths += 1;
                    tracing::warn!(cache, hash_part, error = %err, "path record does not parse");
                    report.unreadable_paths.push((cache.clone(), hash_part.clone()));
                    damaged.insert((cache.clone(), hash_part));
                    continue;
                }
                Err(err) => {
                    report.problem(format!("path record caches/{cache}/paths/{hash_part}: {err}"));
                    continue;
                }
            };
            report.paths += 1;
            let path = (cache.clone(), record.store_path.clone());
            let manifest = match storage.get_manifest(&record.nar_hash).await {
                Ok(Some(manifest)) => manifest,
                Ok(None) => {
                    report.missing_manifests.push(path.clone());
                    damaged.insert(path);
                    continue;
                }
                Err(err) if damage(err.kind()) => {
                    tracing::warn!(cache, store_path = record.store_path, error = %err, "manifest does not parse");
                    report.unreadable_manifests.push(path.clone());
                    damaged.insert(path);
                    continue;
                }
                Err(err) => {
                    report.problem(format!("manifest of {}/{}: {err}", cache, record.store_path));
                    continue;
                }
            };
            if let Err(err) = manifest.validate() {
                tracing::warn!(cache, store_path = record.store_path, error = %err, "manifest is inconsistent");
                report.unreadable_manifests.push(path.clone());
                damaged.insert(path);
                continue;
            }
            for chunk_ref in &manifest.chunks {
                sizes.insert(chunk_ref.hash, chunk_ref.size);
                users.entry(chunk_ref.hash).or_default().push(path.clone());
            }
        }
        check_bazel_blobs(storage, &cache, &mut report, &mut sizes, &mut blob_users, &mut damaged_blobs).await;
    }
    report.chunks_checked = sizes.len();
    let verdicts: Vec<(ChunkHash, std::result::Result<Option<ErrorKind>, String>)> = futures::stream::iter(sizes)
        .map(|(hash, size)| {
            let storage = storage.clone();
            let task = tokio::spawn(async move {
                match storage.get_chunk(&hash).await {
                    Ok(frame) => chunk::decompress_verified(&frame, &hash, size as usize).err().map(|e| e.kind()),
                    Err(err) => Some(err.kind()),
                }
            });
            async move { (hash, task.await.map_err(|e| format!("checking chunk {hash} failed: {e}"))) }
        })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    for (hash, verdict) in verdicts {
        match verdict {
            Ok(None) => {}
            Ok(Some(ErrorKind::Corrupt)) => match storage.chunk_size(&hash).await {
                Ok(None) => {
                    report.missing.insert(hash);
                }
                Ok(Some(_)) => {
                    report.corrupt.insert(hash);
                }
                Err(err) => report.problem(format!("chunk {hash} did not verify, then could not be looked up: {err}")),
            },
            // Storage that does not answer says nothing about the chunk: name it, and leave
            // the paths that need it in service.
            Ok(Some(kind)) => report.problem(format!("chunk {hash} could not be read ({kind:?})")),
            Err(err) => report.problem(err),
        }
    }
    // The packs behind chunks that failed, then every pack on its own.
    for hash in report.corrupt.clone() {
        if let Ok(Some(pointer)) = storage.chunk_pointer(&hash).await {
            report.damaged_packs.insert(pointer.pack);
        }
    }
    check_packs(storage, &mut report).await;
    damaged.extend(report.missing.iter().chain(&report.corrupt).flat_map(|hash| users.get(hash).cloned().unwrap_or_default()));
    report.damaged_paths = damaged.into_iter().collect();
    damaged_blobs
        .extend(report.missing.iter().chain(&report.corrupt).flat_map(|hash| blob_users.get(hash).cloned().unwrap_or_default()));
    report.damaged_blobs = damaged_blobs.into_iter().collect();
    if repair {
        for (cache, name) in report.damaged_paths.clone() {
            // Named by store path, or by hash part when the record did not parse: both start
            // with the hash part.
            if let Err(err) = storage.delete_path(&cache, &name[..32.min(name.len())]).await {
                report.problem(format!("taking {cache}/{name} out of service: {err}"));
            }
        }
        for (cache, sha256) in report.damaged_blobs.clone() {
            // Without its record the blob reads as missing, and Bazel uploads it again.
            let key = object_store::path::Path::from(format!("{}/{sha256}", crate::bazel::records_prefix(&cache, crate::bazel::Store::Cas)));
            if let Err(err) = storage.delete_object(&key).await {
                report.problem(format!("taking Bazel blob {cache}/{sha256} out: {err}"));
            }
        }
        for hash in report.corrupt.clone() {
            if let Err(err) = storage.delete_chunk(&hash).await {
                report.problem(format!("deleting corrupt chunk {hash}: {err}"));
            }
        }
        for pack in report.damaged_packs.clone() {
            rescue_pack(storage, &pack, &mut report).await;
        }
        report.repaired = true;
    }
    Ok(report)
}

/// Larger than any pack compaction writes (a pack is made in memory, at most 64 MiB of chunks):
/// such an object is not read into memory.
const MAX_PACK_OBJECT: u64 = 128 << 20;

/// Reads every pack whole: its bytes must hash to its name, and its index and every chunk in it
/// must check out.
async fn check_packs(storage: &Storage, report: &mut FsckReport) {
    let packs = match storage.list_objects("packs").await {
        Ok(packs) => packs,
        Err(err) => return report.problem(format!("packs could not be listed: {err}")),
    };
    for meta in packs {
        let Some(id) = Storage::pack_of_key(&meta.location) else { continue };
        report.packs_checked += 1;
        if meta.size > MAX_PACK_OBJECT {
            tracing::warn!(pack = %id, size = meta.size, "pack is larger than any pack compaction writes");
            report.damaged_packs.insert(id);
            continue;
        }
        let bytes = match storage.get_pack(&id).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(err) => {
                report.problem(format!("pack {id}: {err}"));
                continue;
            }
        };
        let sound = ChunkHash::of(&bytes) == id
            && flywheel_core::chunk::pack::PackIndex::parse(&bytes, bytes.len() as u64)
                .and_then(|index| index.verify(&bytes))
                .is_ok_and(|bad| bad.is_empty());
        if !sound {
            tracing::warn!(pack = %id, "pack does not match its name or its index");
            report.damaged_packs.insert(id);
        }
    }
}

/// Moves every chunk that still verifies out of a damaged pack (each becomes a frame of its own
/// again), deletes the pointers of those that do not, then the pack: nothing points into it
/// any more, and fsck stops naming it. A reader holding an old pointer finds the pack gone and
/// reads the chunk's object again.
async fn rescue_pack(storage: &Storage, id: &ChunkHash, report: &mut FsckReport) {
    let index = match storage.pack_size(id).await {
        Ok(Some(size)) if size <= MAX_PACK_OBJECT => storage.get_pack_index(id, size).await.ok(),
        Ok(Some(_)) => None,
        Ok(None) => return,
        Err(err) => return report.problem(format!("pack {id}: {err}; left as it is")),
    };
    for entry in index.map(|index| index.chunks).unwrap_or_default() {
        match storage.chunk_pointer(&entry.hash).await {
            Ok(Some(pointer)) if pointer.pack == *id => {}
            Ok(_) => continue,
            Err(err) => {
                report.problem(format!("chunk {}: {err}; pack {id} kept", entry.hash));
                return;
            }
        }
        let moved = match storage.get_chunk(&entry.hash).await {
            Ok(frame) => match chunk::decompress_verified(&frame, &entry.hash, entry.len as usize)
                .and_then(|data| chunk::compress(&data, chunk::DEFAULT_ZSTD_LEVEL))
            {
                Ok(own) => storage.put_chunk(&entry.hash, bytes::Bytes::from(own)).await.map(|_| ()),
                Err(_) => {
                    report.corrupt.insert(entry.hash);
                    storage.delete_chunk(&entry.hash).await
                }
            },
            Err(err) if err.kind() == ErrorKind::Corrupt => {
                report.corrupt.insert(entry.hash);
                storage.delete_chunk(&entry.hash).await
            }
            Err(err) => Err(err),
        };
        if let Err(err) = moved {
            report.problem(format!("moving chunk {} out of damaged pack {id}: {err}; pack kept", entry.hash));
            return;
        }
    }
    if let Err(err) = storage.delete_pack(id).await {
        report.problem(format!("deleting damaged pack {id}: {err}"));
    }
}

/// Reads a cache's Bazel blob records: chunked ones add their chunks to those to verify,
/// inline ones are checked here, and records that do not decode are damaged.
async fn check_bazel_blobs(
    storage: &Storage,
    cache: &str,
    report: &mut FsckReport,
    sizes: &mut BTreeMap<ChunkHash, u32>,
    users: &mut HashMap<ChunkHash, Vec<(String, String)>>,
    damaged: &mut BTreeSet<(String, String)>,
) {
    use crate::bazel::record::BlobRecord;
    use sha2::Digest;
    let prefix = crate::bazel::records_prefix(cache, crate::bazel::Store::Cas);
    let records = match storage.list_objects(&prefix).await {
        Ok(records) => records,
        Err(err) => {
            report.problem(format!("cache {cache}: Bazel blobs could not be listed: {err}"));
            return;
        }
    };
    for meta in records {
        let Some(sha256) = meta.location.filename().map(str::to_string) else { continue };
        let bytes = match storage.get_object(&meta.location).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(err) => {
                report.problem(format!("{}: {err}", meta.location));
                continue;
            }
        };
        report.blobs += 1;
        let blob = (cache.to_string(), sha256.clone());
        match BlobRecord::decode(&bytes) {
            Ok(BlobRecord::Chunks { chunks, .. }) => {
                for chunk_ref in chunks {
                    sizes.insert(chunk_ref.hash, chunk_ref.size);
                    users.entry(chunk_ref.hash).or_default().push(blob.clone());
                }
            }
            Ok(BlobRecord::Inline { size, frame }) => {
                let whole = zstd::bulk::decompress(&frame, size as usize)
                    .is_ok_and(|data| data.len() as u64 == size && hex::encode(sha2::Sha256::digest(&data)) == sha256);
                if !whole {
                    tracing::warn!(cache, sha256, "inline Bazel blob does not hash to its name");
                    damaged.insert(blob);
                }
            }
            Err(err) => {
                tracing::warn!(cache, sha256, error = %err, "Bazel blob record does not decode");
                damaged.insert(blob);
            }
        }
    }
}

/// Whether an error reading an object means the object itself is bad (rather than that
/// storage did not answer).
fn damage(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Corrupt | ErrorKind::InvalidInput)
}
