//! The scenarios of the conformance suite: plain async functions of a [`Fixture`], each
//! asserting one behaviour the server counts on, whatever the backend.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flywheel_core::chunk::{ChunkHash, ChunkParams};
use flywheel_core::manifest::Manifest;
use flywheel_core::nar::NarWriter;
use flywheel_core::nix::{SigningKey, StorePath};
use flywheel_core::ErrorKind;
use flywheel_server::clock::Clock;
use flywheel_server::config::{CompactionConfig, GcConfig};
use flywheel_server::ingest::{Compression, IngestSettings, IngestStats, Ingested, Ingester};
use flywheel_server::metrics::Metrics;
use flywheel_server::storage::{CacheFile, CacheRecord, PathRecord, Reuse, Storage};
use object_store::path::Path;
use rand::{RngCore, SeedableRng};

use super::Fixture;

const CACHE: &str = "ci";

/// A NAR of one regular file of `len` pseudo-random bytes drawn from `seed`: incompressible,
/// so it makes several chunks, and distinct seeds share none.
fn nar(seed: u64, len: usize) -> Vec<u8> {
    let mut contents = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut contents);
    let mut writer = NarWriter::new(Vec::new()).expect("writing to memory");
    writer.regular(false, len as u64, &mut &contents[..]).expect("writing to memory");
    writer.into_inner()
}

/// A NAR's chunks stored through the server's ingester, its manifest not yet (`grace` is the
/// grace period the reuse window follows).
async fn ingest(storage: &Storage, grace: u64, nar: &[u8]) -> Ingested {
    let settings = IngestSettings { params: ChunkParams::default(), zstd_level: flywheel_core::chunk::DEFAULT_ZSTD_LEVEL, parallelism: 8 };
    let ingester = Ingester::new(
        storage.clone(),
        settings,
        storage.reuse_window(grace),
        Arc::new(Metrics::default()),
    );
    let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::copy_from_slice(nar))]);
    ingester.ingest(body, Compression::None).await.expect("ingesting a valid NAR")
}

/// A NAR stored (chunks, then manifest) as an upload stores it.
async fn upload(storage: &Storage, grace: u64, nar: &[u8]) -> (Manifest, IngestStats) {
    ingest(storage, grace, nar).await.commit().await.expect("committing an upload")
}

/// The path record of a NAR named `name`, published now by `storage`'s clock.
fn record(storage: &Storage, seed: u64, name: &str, manifest: &Manifest) -> PathRecord {
    let mut digest = [0u8; 20];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut digest);
    PathRecord {
        store_path: StorePath::new(digest, name).expect("a valid store path name").base_name(),
        nar_hash: manifest.nar_hash,
        nar_size: manifest.nar_size,
        references: Vec::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
        created_at: storage.clock().now_secs(),
        nar_file: None,
    }
}

/// Uploads and publishes a path of `len` bytes; returns its record and chunks.
async fn publish(storage: &Storage, grace: u64, seed: u64, name: &str, len: usize) -> (PathRecord, BTreeSet<ChunkHash>) {
    let (manifest, _) = upload(storage, grace, &nar(seed, len)).await;
    let path = record(storage, seed, name, &manifest);
    storage.put_path(CACHE, &path).await.expect("publishing a path");
    (path, manifest.chunks.iter().map(|c| c.hash).collect())
}

async fn create_cache(storage: &Storage, name: &str, retention_period: Option<u32>) -> CacheRecord {
    let record = CacheRecord {
        name: name.to_string(),
        signing_key: SigningKey::generate(&format!("{name}-1")).expect("a signing key").to_nix_string(),
        is_public: false,
        store_dir: "/nix/store".into(),
        priority: 41,
        upstream_cache_key_names: Vec::new(),
        retention_period,
        trusted_uploader_keys: Vec::new(),
        require_uploader_signature: false,
    };
    storage.put_cache(&record).await.expect("storing a cache");
    record
}

fn gc_config(grace_period: u64) -> GcConfig {
    GcConfig { default_retention_period: 0, interval: 0, grace_period, access_record_interval: 0 }
}

/// The chunks stored, by listing.
async fn stored_chunks(storage: &Storage) -> BTreeSet<ChunkHash> {
    let listed = storage.list_objects("chunks").await.expect("listing chunks");
    listed.iter().filter_map(|meta| meta.location.filename()?.parse().ok()).collect()
}

fn hash_part(path: &PathRecord) -> &str {
    &path.store_path[..32]
}

/// Chunks: stored frames read back as written, sizes and version tokens agree, a missing
/// chunk is damage (not a miss) to a reader, and deletes are idempotent.
pub async fn chunks(fixture: &Fixture) {
    let storage = &fixture.storage;
    let data = b"a chunk's uncompressed bytes".repeat(100);
    let hash = ChunkHash::of(&data);
    let frame = Bytes::from(flywheel_core::chunk::compress(&data, 3).expect("compressing"));
    let absent = ChunkHash::of(b"never stored");

    assert_eq!(storage.chunk_size(&hash).await.unwrap(), None);
    assert_eq!(storage.chunk_reusable(&hash, 0).await.unwrap(), Reuse::Missing);
    storage.put_chunk(&hash, frame.clone()).await.unwrap();
    assert_eq!(storage.get_chunk(&hash).await.unwrap(), frame);
    assert_eq!(storage.chunk_size(&hash).await.unwrap(), Some(frame.len() as u64));
    // Writing the same chunk again is harmless: content-addressed writes are idempotent.
    storage.put_chunk(&hash, frame.clone()).await.unwrap();
    assert_eq!(storage.get_chunk(&hash).await.unwrap(), frame);

    let version = storage.chunk_version(&hash).await.unwrap().expect("a stored chunk has a version");
    let (read, read_version) = storage.get_chunk_versioned(&hash).await.unwrap();
    assert_eq!((read, read_version), (frame.clone(), version));
    assert_eq!(storage.chunk_version(&absent).await.unwrap(), None);

    let reusable = storage.chunks_reusable(vec![hash, absent, hash], 0, 4).await.unwrap();
    assert_eq!(reusable, [true, false, true], "answers come in the order asked");

    assert_eq!(storage.get_chunk(&absent).await.unwrap_err().kind(), ErrorKind::Corrupt);
    assert_eq!(storage.get_chunk_versioned(&absent).await.unwrap_err().kind(), ErrorKind::Corrupt);
    storage.delete_chunk(&hash).await.unwrap();
    assert_eq!(storage.chunk_size(&hash).await.unwrap(), None);
    storage.delete_chunk(&hash).await.expect("deleting a missing chunk is not an error");
}

/// Chunks asked for in batches answer as they do one by one, in the order asked, and a
/// conditional write stores a chunk only when no fresh copy is there.
pub async fn chunk_batches(fixture: &Fixture) {
    let storage = &fixture.storage;
    let frames: Vec<(ChunkHash, Bytes)> = (0..20u8)
        .map(|i| {
            let data = vec![i; 1000 + usize::from(i)];
            (ChunkHash::of(&data), Bytes::from(flywheel_core::chunk::compress(&data, 3).expect("compressing")))
        })
        .collect();
    for (hash, frame) in &frames {
        storage.put_chunk(hash, frame.clone()).await.unwrap();
    }
    let absent = ChunkHash::of(b"never stored");
    let mut asked: Vec<ChunkHash> = frames.iter().map(|(hash, _)| *hash).collect();
    asked.insert(7, absent);
    let versions = storage.chunk_versions(asked.clone()).await.unwrap();
    for (hash, version) in asked.iter().zip(&versions) {
        assert_eq!(*version, storage.chunk_version(hash).await.unwrap(), "chunk {hash}");
    }
    assert_eq!(versions[7], None);
    assert!(versions.iter().filter(|v| v.is_some()).count() == frames.len());

    let read = storage.get_chunks_versioned(frames.iter().map(|(hash, _)| *hash).collect()).await;
    assert_eq!(read.len(), frames.len());
    for ((hash, frame), read) in frames.iter().zip(read) {
        let (read_frame, read_version) = read.unwrap();
        assert_eq!(&read_frame, frame, "chunk {hash}");
        assert_eq!(Some(read_version), storage.chunk_version(hash).await.unwrap());
    }
    // A missing chunk in a batch is damage, in its place; the frames before it are answered.
    let read = storage.get_chunks_versioned(asked).await;
    assert_eq!(read.len(), 8, "the answers stop at the missing chunk");
    assert!(read[..7].iter().all(|item| item.is_ok()));
    let err = read[7].as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "a missing chunk in a batch is damage: {err}");

    // A conditional write: stored when missing, left alone while fresh, written again when
    // older than the reuse window.
    let data = b"written on condition".repeat(50);
    let hash = ChunkHash::of(&data);
    let frame = Bytes::from(flywheel_core::chunk::compress(&data, 3).expect("compressing"));
    let make = |frame: &Bytes| {
        let frame = frame.clone();
        move || Ok(frame)
    };
    let window = storage.reuse_window(10);
    let after = window.reusable_after();
    let (reuse, written) = storage.put_chunk_unless_fresh(hash, after, make(&frame)).await.unwrap();
    assert_eq!(reuse, Reuse::Missing);
    let (written_frame, version) = written.expect("a missing chunk is written");
    assert_eq!(written_frame, frame);
    if let Some(version) = version {
        assert_eq!(Some(version), storage.chunk_version(&hash).await.unwrap(), "the write answers the version a lookup gives");
    }
    let never = || -> flywheel_core::Result<Bytes> { panic!("a fresh chunk was compressed again") };
    let (reuse, written) = storage.put_chunk_unless_fresh(hash, after, never).await.unwrap();
    assert_eq!((reuse, written.is_none()), (Reuse::Fresh, true));
    fixture.clock.advance(Duration::from_secs(10));
    let later = window.reusable_after();
    let (reuse, written) = storage.put_chunk_unless_fresh(hash, later, make(&frame)).await.unwrap();
    assert_eq!((reuse, written.is_some()), (Reuse::Stale, true));
    assert_eq!(storage.get_chunk(&hash).await.unwrap(), frame);
    let failing = || -> flywheel_core::Result<Bytes> { Err(flywheel_core::Error::internal("compression failed")) };
    let other = ChunkHash::of(b"not compressible today");
    let err = storage.put_chunk_unless_fresh(other, later, failing).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(storage.chunk_version(&other).await.unwrap(), None, "nothing stored when the frame could not be made");
}

/// Manifests and path records: written in order by an upload, read back equal, listed, and
/// taken out again; a path whose manifest is gone reads as damaged.
pub async fn manifests_and_paths(fixture: &Fixture) {
    let storage = &fixture.storage;
    create_cache(storage, CACHE, None).await;
    let (manifest, stats) = upload(storage, 3600, &nar(1, 600 << 10)).await;
    assert!(manifest.chunks.len() > 2, "{} chunks", manifest.chunks.len());
    assert_eq!((stats.chunks, stats.new_chunks), (manifest.chunks.len(), manifest.chunks.len()));
    for chunk in &manifest.chunks {
        assert!(storage.chunk_size(&chunk.hash).await.unwrap().is_some(), "chunk {} of the manifest", chunk.hash);
    }
    assert_eq!(storage.get_manifest(&manifest.nar_hash).await.unwrap().as_ref(), Some(&manifest));
    let json = storage.get_manifest_json(&manifest.nar_hash).await.unwrap().expect("the stored JSON");
    assert_eq!(serde_json::from_slice::<Manifest>(&json).unwrap(), manifest);

    // The same NAR again stores nothing new.
    let (again, stats) = upload(storage, 3600, &nar(1, 600 << 10)).await;
    assert_eq!((again, stats.new_chunks, stats.new_stored_bytes), (manifest.clone(), 0, 0));

    let path = record(storage, 1, "hello-2.12", &manifest);
    let hash = hash_part(&path).to_string();
    assert!(!storage.has_path(CACHE, &hash).await.unwrap());
    assert!(storage.get_path(CACHE, &hash).await.unwrap().is_none());
    storage.put_path(CACHE, &path).await.unwrap();
    assert!(storage.has_path(CACHE, &hash).await.unwrap());
    let read = storage.get_path(CACHE, &hash).await.unwrap().expect("a published path");
    assert_eq!((read.store_path.as_str(), read.nar_hash, read.nar_size), (path.store_path.as_str(), path.nar_hash, path.nar_size));
    assert_eq!(storage.manifest_of(&read).await.unwrap(), manifest);
    assert_eq!(storage.list_paths(CACHE).await.unwrap(), std::slice::from_ref(&hash));
    assert_eq!(storage.newest_of_name(CACHE, "hello").await.unwrap().as_deref(), Some(hash.as_str()));
    let other = "0".repeat(32);
    assert_eq!(storage.paths_present(CACHE, vec![other.clone(), hash.clone(), other], 4).await.unwrap(), [false, true, false]);

    storage.put_access(CACHE, &hash).await.unwrap();
    assert_eq!(storage.get_access(CACHE, &hash).await.unwrap(), Some(fixture.clock.now_secs()));
    storage.delete_path(CACHE, &hash).await.unwrap();
    assert!(!storage.has_path(CACHE, &hash).await.unwrap());
    assert_eq!(storage.get_access(CACHE, &hash).await.unwrap(), None, "the access record goes with the path");
    assert!(storage.get_manifest(&manifest.nar_hash).await.unwrap().is_some(), "manifests stay for garbage collection");

    // A path whose manifest is gone is damage, not a miss.
    let orphan = record(storage, 2, "orphan-1", &Manifest { nar_hash: flywheel_core::nix::Sha256Hash::digest(b"x"), ..manifest });
    assert_eq!(storage.get_manifest(&orphan.nar_hash).await.unwrap(), None);
    assert_eq!(storage.manifest_of(&orphan).await.unwrap_err().kind(), ErrorKind::Corrupt);
}

/// Listings: caches by name, paths per cache, and prefixes that stop at a key's segments (a
/// cache named `ci` does not list, or delete, the objects of `ci2`).
pub async fn listings(fixture: &Fixture) {
    let storage = &fixture.storage;
    let ci = create_cache(storage, CACHE, Some(60)).await;
    create_cache(storage, "ci2", None).await;
    assert_eq!(storage.get_cache(CACHE).await.unwrap().as_ref(), Some(&ci));
    assert_eq!(storage.get_cache("nope").await.unwrap(), None);
    let caches: BTreeSet<String> = storage.list_caches().await.unwrap().into_iter().collect();
    assert_eq!(caches, BTreeSet::from([CACHE.to_string(), "ci2".to_string()]));

    let (manifest, _) = upload(storage, 3600, &nar(3, 40 << 10)).await;
    let mut published = BTreeSet::new();
    for (seed, cache) in [(10, CACHE), (11, CACHE), (12, "ci2")] {
        let path = record(storage, seed, &format!("p{seed}"), &manifest);
        storage.put_path(cache, &path).await.unwrap();
        published.insert((cache, hash_part(&path).to_string()));
    }
    let listed = |cache: &'static str| async move {
        storage.list_paths(cache).await.unwrap().into_iter().map(|h| (cache, h)).collect::<BTreeSet<_>>()
    };
    let in_ci = listed(CACHE).await;
    assert_eq!(in_ci.len(), 2);
    assert_eq!(in_ci.iter().chain(&listed("ci2").await).cloned().collect::<BTreeSet<_>>(), published);
    assert!(storage.list_objects("caches/c").await.unwrap().is_empty(), "a prefix matches whole segments");
    assert!(storage.list_objects("nothing/here").await.unwrap().is_empty());

    storage.delete_cache(CACHE).await.unwrap();
    assert_eq!(storage.get_cache(CACHE).await.unwrap(), None);
    assert!(storage.list_objects(&format!("caches/{CACHE}")).await.unwrap().is_empty());
    // Local storage may still list the emptied folder as a cache; without settings it is none.
    for name in storage.list_caches().await.unwrap() {
        assert!(name == "ci2" || storage.get_cache(&name).await.unwrap().is_none(), "cache {name} is still there");
    }
    assert_eq!(storage.list_paths("ci2").await.unwrap().len(), 1, "deleting ci left ci2 alone");
}

/// The small files a cache keeps beside its paths, each kind in its own folder.
pub async fn cache_files(fixture: &Fixture) {
    let storage = &fixture.storage;
    let files = [
        CacheFile::Log("abc-hello.drv"),
        CacheFile::DebugInfo("0123abcd"),
        CacheFile::Realisation("00ff/out"),
        CacheFile::BuildTrace("abc-hello.drv/out"),
        CacheFile::Trace("job-1"),
    ];
    for (n, file) in files.iter().enumerate() {
        assert_eq!(storage.get_cache_file(CACHE, *file).await.unwrap(), None);
        storage.put_cache_file(CACHE, *file, Bytes::from(vec![n as u8; 10])).await.unwrap();
    }
    for (n, file) in files.iter().enumerate() {
        assert_eq!(storage.get_cache_file(CACHE, *file).await.unwrap(), Some(Bytes::from(vec![n as u8; 10])), "{file:?}");
    }
    let hash = "0".repeat(31) + "1";
    storage.put_nar_file(CACHE, "1abc.nar.xz", &hash).await.unwrap();
    assert_eq!(storage.nar_file_path(CACHE, "1abc.nar.xz").await.unwrap(), Some(hash));
    assert_eq!(storage.nar_file_path(CACHE, "other.nar.xz").await.unwrap(), None);
    let logs = storage.list_objects(&format!("caches/{CACHE}/{}", CacheFile::LOGS)).await.unwrap();
    assert_eq!(logs.len(), 1);
}

/// Chunk grants: a cache holds a chunk once its bytes were uploaded to it, and only then.
pub async fn grants(fixture: &Fixture) {
    let storage = &fixture.storage;
    let [a, b, c] = [b"a".as_slice(), b"b", b"c"].map(ChunkHash::of);
    assert_eq!(storage.chunks_held(CACHE, &[a, b], 4).await.unwrap(), [false, false]);
    assert_eq!(storage.grant_chunks(CACHE, &[a, b], 4).await.unwrap(), [false, false], "held before the grant");
    assert_eq!(storage.grant_chunks(CACHE, &[b, c], 4).await.unwrap(), [true, false]);
    assert_eq!(storage.chunks_held(CACHE, &[a, b, c], 4).await.unwrap(), [true, true, true]);
    assert_eq!(storage.chunks_held("other", &[a], 4).await.unwrap(), [false], "grants are per cache");
    storage.put_grants("other", &[a], 4).await.unwrap();
    assert_eq!(storage.chunks_held("other", &[a, b], 4).await.unwrap(), [true, false]);
    let listed = storage.list_objects(&format!("caches/{CACHE}/chunks")).await.unwrap();
    let granted: BTreeSet<ChunkHash> = listed.iter().filter_map(|meta| Storage::granted_chunk(&meta.location)).collect();
    assert_eq!(granted, BTreeSet::from([a, b, c]));
}

/// Garbage collection keeps what published paths use, and sweeps unreferenced manifests and
/// chunks only once they are older than the grace period.
pub async fn gc_sweeps_garbage_only_after_the_grace_period(fixture: &Fixture) {
    let storage = &fixture.storage;
    let grace = 60;
    create_cache(storage, CACHE, None).await;
    let (live, live_chunks) = publish(storage, grace, 20, "live-1", 500 << 10).await;
    // Uploaded, never published.
    let (unpublished, _) = upload(storage, grace, &nar(21, 300 << 10)).await;
    let orphan_data = b"an orphan chunk".repeat(10);
    let orphan = ChunkHash::of(&orphan_data);
    storage.put_chunk(&orphan, Bytes::from(flywheel_core::chunk::compress(&orphan_data, 3).unwrap())).await.unwrap();
    let all = stored_chunks(storage).await;
    let garbage: BTreeSet<ChunkHash> = all.difference(&live_chunks).copied().collect();
    assert!(garbage.contains(&orphan) && garbage.len() > 1, "{} garbage chunks", garbage.len());

    // Young garbage stays: an upload in flight may count on it.
    let report = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.chunks_deleted, report.manifests_deleted), (0, 0));
    assert_eq!(stored_chunks(storage).await, all);

    fixture.clock.advance(Duration::from_secs(2 * grace));
    let dry = flywheel_server::gc::collect(storage, &gc_config(grace), true).await.unwrap();
    assert_eq!((dry.chunks_deleted, dry.manifests_deleted, dry.dry_run), (garbage.len(), 1, true));
    assert_eq!(stored_chunks(storage).await, all, "a dry run deleted");

    let report = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.chunks_deleted, report.manifests_deleted, report.chunks_kept), (garbage.len(), 1, live_chunks.len()));
    assert!(report.expired_paths.is_empty());
    assert_eq!(stored_chunks(storage).await, live_chunks);
    assert!(storage.get_manifest(&unpublished.nar_hash).await.unwrap().is_none());
    assert!(storage.manifest_of(&live).await.is_ok());
    assert!(storage.has_path(CACHE, hash_part(&live)).await.unwrap());

    // Nothing left to do.
    let again = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert_eq!((again.chunks_deleted, again.manifests_deleted), (0, 0));
}

/// A path not read within its cache's retention period expires, with the chunks only it used;
/// reads renew it. Logs expire with the retention period too. (`tests/server_ops.rs` checks the
/// same through `flywheel serve` and real Nix, on stored records aged by hand.)
pub async fn retention_expires_unread_paths(fixture: &Fixture) {
    let storage = &fixture.storage;
    let retention = 10;
    create_cache(storage, CACHE, Some(retention)).await;
    let mut paths = Vec::new();
    for (seed, name) in [(30, "big-1"), (31, "bigNext-1"), (32, "single-1")] {
        let (path, chunks) = publish(storage, 0, seed, name, 300 << 10).await;
        storage.put_access(CACHE, hash_part(&path)).await.unwrap();
        paths.push((path, chunks));
    }
    storage.put_cache_file(CACHE, CacheFile::Log("abc-big.drv"), Bytes::from_static(b"log")).await.unwrap();

    // Within the period nothing expires.
    let report = flywheel_server::gc::collect(storage, &gc_config(0), false).await.unwrap();
    assert!(report.expired_paths.is_empty() && report.logs_deleted == 0, "{report:?}");

    // Past it, `big` and `single` are read again, `bigNext` is not.
    fixture.clock.advance(Duration::from_secs(3 * u64::from(retention)));
    for (path, _) in [&paths[0], &paths[2]] {
        storage.put_access(CACHE, hash_part(path)).await.unwrap();
    }
    let report = flywheel_server::gc::collect(storage, &gc_config(0), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.expired_paths, [(CACHE.to_string(), paths[1].0.store_path.clone())]);
    assert_eq!(report.logs_deleted, 1);
    assert!(!storage.has_path(CACHE, hash_part(&paths[1].0)).await.unwrap());
    let kept: BTreeSet<ChunkHash> = paths[0].1.union(&paths[2].1).copied().collect();
    assert_eq!(stored_chunks(storage).await, kept, "exactly the chunks only the expired path used are gone");
    for (path, _) in [&paths[0], &paths[2]] {
        assert!(storage.manifest_of(path).await.is_ok());
    }
    let fsck = flywheel_server::fsck::fsck(storage, 4, false).await.unwrap();
    assert_eq!((fsck.paths, fsck.damaged_paths.len()), (2, 0));
}

/// An upload counts only on chunks written within half the grace period; older ones are
/// reported missing and written again. (`tests/server_ops.rs` checks the same through
/// `flywheel serve`, on chunk files aged by hand.)
pub async fn reuse_window_makes_old_chunks_written_again(fixture: &Fixture) {
    let storage = &fixture.storage;
    let grace = 10;
    let nar = nar(40, 400 << 10);
    let (manifest, _) = upload(storage, grace, &nar).await;
    let hashes: Vec<ChunkHash> = manifest.chunks.iter().map(|c| c.hash).collect();
    let window = storage.reuse_window(grace);
    let fresh = storage.chunks_reusable(hashes.clone(), window.reusable_after(), 4).await.unwrap();
    assert!(fresh.iter().all(|f| *f), "chunks just written count as stored");
    let (_, stats) = upload(storage, grace, &nar).await;
    assert_eq!((stats.new_chunks, stats.new_stored_bytes), (0, 0), "fresh chunks are counted on, not written again");

    // Past half the grace period they are stale: missing to an uploader, and written again.
    fixture.clock.advance(Duration::from_secs(grace));
    let stale = storage.chunks_reusable(hashes.clone(), window.reusable_after(), 4).await.unwrap();
    assert!(stale.iter().all(|f| !*f), "stale chunks must be sent again: {stale:?}");
    assert_eq!(storage.chunk_reusable(&hashes[0], window.reusable_after()).await.unwrap(), Reuse::Stale);
    let (again, stats) = upload(storage, grace, &nar).await;
    assert_eq!(again, manifest);
    assert_eq!(stats.new_chunks, 0, "they were stored already");
    assert!(stats.new_stored_bytes > 0, "stale chunks were trusted, not written again");

    // An upload that took longer than the window may have counted on chunks a collection has
    // swept since: storing its manifest then fails, so that the path is not published.
    let started = storage.clock().now_ms();
    let limit = window.max_upload().expect("a grace period bounds uploads");
    storage.put_upload_manifest(&manifest, started, window.clone(), &[], "upload").await.unwrap();
    fixture.clock.advance(limit + Duration::from_secs(1));
    let late = storage.put_upload_manifest(&manifest, started, window, &[], "upload").await.unwrap_err();
    assert_eq!(late.kind(), ErrorKind::Unavailable, "{late}");

    // With no grace period there is no window: every stored chunk counts.
    let unbounded = storage.reuse_window(0);
    assert_eq!(unbounded.reusable_after(), 0);
    assert_eq!(unbounded.max_upload(), None);
}

/// Staging: a NAR received through a Nix PUT is kept (marker, manifest and chunks) within the
/// grace period so that its narinfo can publish it, and swept after; on local storage, the
/// staging files a crash leaves behind are swept once older than the grace period.
pub async fn staging(fixture: &Fixture) {
    let storage = &fixture.storage;
    let grace = 60;
    create_cache(storage, CACHE, None).await;
    let (staged, _) = upload(storage, grace, &nar(50, 200 << 10)).await;
    storage.put_pending(CACHE, &staged.nar_hash).await.unwrap();
    assert!(storage.has_pending(CACHE, &staged.nar_hash).await.unwrap());
    assert!(!storage.has_pending("other", &staged.nar_hash).await.unwrap(), "staging is per cache");

    // A staging file that a `kill -9` left in local storage: invisible to listings.
    let leftover = fixture.local_root.as_ref().map(|root| {
        let dir = root.join("chunks/ab");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}#7", "ab".repeat(32)));
        std::fs::write(&file, vec![0u8; 1000]).unwrap();
        file
    });
    if leftover.is_some() {
        let listed = storage.list_objects("chunks").await.unwrap();
        assert!(listed.iter().all(|meta| !meta.location.as_ref().contains('#')), "listings show staging files");
    }
    let sweep = |dry_run: bool| {
        let root = fixture.local_root.as_deref().expect("local storage");
        flywheel_server::gc::sweep_local_staging(root, Duration::from_secs(grace), fixture.clock.as_ref(), dry_run).unwrap()
    };

    let report = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert_eq!((report.manifests_deleted, report.chunks_deleted), (0, 0));
    assert!(storage.has_pending(CACHE, &staged.nar_hash).await.unwrap());
    if leftover.is_some() {
        assert_eq!(sweep(false), (0, 0), "a young staging file may be a write in flight");
    }

    fixture.clock.advance(Duration::from_secs(2 * grace));
    if let Some(file) = &leftover {
        assert_eq!(sweep(true), (1, 1000));
        assert!(file.exists(), "a dry run deleted");
        assert_eq!(sweep(false), (1, 1000));
        assert!(!file.exists());
    }
    let report = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(!storage.has_pending(CACHE, &staged.nar_hash).await.unwrap(), "an old staging marker stays");
    assert_eq!(report.manifests_deleted, 1);
    assert!(storage.get_manifest(&staged.nar_hash).await.unwrap().is_none());
    assert!(stored_chunks(storage).await.is_empty());
}

/// fsck verifies every chunk of every published path, finds missing and corrupt ones and
/// paths without manifests, and with repair takes the damaged paths out of service.
pub async fn fsck_finds_and_repairs_damage(fixture: &Fixture) {
    let storage = &fixture.storage;
    create_cache(storage, CACHE, None).await;
    let (whole, _) = publish(storage, 3600, 60, "whole-1", 100 << 10).await;
    let (hurt, hurt_chunks) = publish(storage, 3600, 61, "hurt-1", 400 << 10).await;
    let clean = flywheel_server::fsck::fsck(storage, 4, false).await.unwrap();
    assert_eq!((clean.paths, clean.damaged_paths.len(), clean.problems.len()), (2, 0, 0), "{clean:?}");
    assert!(clean.chunks_checked > hurt_chunks.len(), "the chunks of both paths are checked");

    let mut hurt_chunks = hurt_chunks.into_iter();
    let missing = hurt_chunks.next().unwrap();
    let corrupt = hurt_chunks.next().unwrap();
    storage.delete_chunk(&missing).await.unwrap();
    storage.put_chunk(&corrupt, Bytes::from(flywheel_core::chunk::compress(b"other bytes", 3).unwrap())).await.unwrap();
    let (lost_manifest, _) = upload(storage, 3600, &nar(62, 20 << 10)).await;
    let lost = record(storage, 62, "lost-1", &lost_manifest);
    storage.put_path(CACHE, &lost).await.unwrap();
    storage.delete_object(&Path::from(format!("manifests/{}.json", lost_manifest.nar_hash.to_base32_bare()))).await.unwrap();

    let found = flywheel_server::fsck::fsck(storage, 4, false).await.unwrap();
    assert_eq!(found.missing, BTreeSet::from([missing]));
    assert_eq!(found.corrupt, BTreeSet::from([corrupt]));
    assert_eq!(found.missing_manifests, [(CACHE.to_string(), lost.store_path.clone())]);
    let damaged: BTreeSet<&str> = found.damaged_paths.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(damaged, BTreeSet::from([hurt.store_path.as_str(), lost.store_path.as_str()]));
    assert!(!found.repaired && storage.has_path(CACHE, hash_part(&hurt)).await.unwrap(), "a check without repair changed something");

    let repaired = flywheel_server::fsck::fsck(storage, 4, true).await.unwrap();
    assert!(repaired.repaired && repaired.problems.is_empty(), "{:?}", repaired.problems);
    assert!(!storage.has_path(CACHE, hash_part(&hurt)).await.unwrap());
    assert!(!storage.has_path(CACHE, hash_part(&lost)).await.unwrap());
    assert!(storage.has_path(CACHE, hash_part(&whole)).await.unwrap());
    assert_eq!(storage.chunk_size(&corrupt).await.unwrap(), None, "the corrupt chunk is deleted, so a re-push writes it");
    let after = flywheel_server::fsck::fsck(storage, 4, false).await.unwrap();
    assert_eq!((after.paths, after.damaged_paths.len()), (1, 0));
}

/// Replicas share nothing but the objects: what one writes the other reads at once, a NAR
/// staged on one is published by the other, and a collection on one keeps what an upload on
/// the other is doing and what it published.
pub async fn replicas(fixture: &Fixture) {
    let (a, b) = (&fixture.storage, &fixture.replica());
    let grace = 60;
    let settings = create_cache(a, CACHE, None).await;
    assert_eq!(b.get_cache(CACHE).await.unwrap(), Some(settings));

    // Nix PUTs the NAR to one replica and the narinfo to the other.
    let (staged, _) = upload(a, grace, &nar(70, 300 << 10)).await;
    a.put_pending(CACHE, &staged.nar_hash).await.unwrap();
    assert!(b.has_pending(CACHE, &staged.nar_hash).await.unwrap());
    let path = record(b, 70, "staged-1", &b.get_manifest(&staged.nar_hash).await.unwrap().expect("the manifest on b"));
    b.put_path(CACHE, &path).await.unwrap();
    assert!(a.manifest_of(&a.get_path(CACHE, hash_part(&path)).await.unwrap().expect("the path on a")).await.is_ok());

    // An upload on b has stored its chunks, not its manifest, while a collects.
    let in_flight = ingest(b, grace, &nar(71, 300 << 10)).await;
    let report = flywheel_server::gc::collect(a, &gc_config(grace), false).await.unwrap();
    assert_eq!((report.chunks_deleted, report.manifests_deleted), (0, 0), "{report:?}");
    let (manifest, _) = in_flight.commit().await.expect("the upload on b finishes");
    let second = record(b, 71, "second-1", &manifest);
    b.put_path(CACHE, &second).await.unwrap();

    // Long after, both paths are whole and a collection on either keeps them.
    fixture.clock.advance(Duration::from_secs(2 * grace));
    for collector in [a, b] {
        let report = flywheel_server::gc::collect(collector, &gc_config(grace), false).await.unwrap();
        assert!(report.problems.is_empty() && report.chunks_deleted == 0, "{report:?}");
    }
    assert!(!a.has_pending(CACHE, &staged.nar_hash).await.unwrap(), "the staging marker went after the grace period");
    let fsck = flywheel_server::fsck::fsck(b, 4, false).await.unwrap();
    assert_eq!((fsck.paths, fsck.damaged_paths.len()), (2, 0));
}

/// The writes that depend on what storage holds: an upload that wrote stale chunks again
/// refuses to commit when one of them is gone once its manifest is stored (a collection swept
/// it in between), and a chunk's version token changes with what is stored under it.
pub async fn conditional_writes(fixture: &Fixture) {
    let storage = &fixture.storage;
    let grace = 10;
    let nar = nar(80, 400 << 10);
    let (manifest, _) = upload(storage, grace, &nar).await;
    fixture.clock.advance(Duration::from_secs(grace));

    // Every chunk is stale now, so the upload writes them all again; then a collection that
    // listed them before sweeps one.
    let in_flight = ingest(storage, grace, &nar).await;
    assert!(in_flight.stats.new_stored_bytes > 0);
    let swept = manifest.chunks[1].hash;
    storage.delete_chunk(&swept).await.unwrap();
    let err = in_flight.commit().await.expect_err("an upload whose chunk was swept must not commit");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(&swept.to_string()), "{err}");
    // The client pushes again, which repairs it.
    let (_, stats) = upload(storage, grace, &nar).await;
    assert_eq!(stats.new_chunks, 1);
    assert!(storage.chunk_size(&swept).await.unwrap().is_some());

    // Other bytes under a chunk's key (damage) give another version: what a reader checked
    // before is checked again.
    let before = storage.chunk_version(&swept).await.unwrap().expect("stored");
    storage.put_chunk(&swept, Bytes::from(flywheel_core::chunk::compress(b"damage", 3).unwrap())).await.unwrap();
    let after = storage.chunk_version(&swept).await.unwrap().expect("stored");
    assert_ne!(before, after, "a rewrite with other bytes kept the version token");
}

/// Seconds past `cold-after` that compaction scenarios move the clock: chunk objects carry the
/// real time of their write, which on a busy machine runs some seconds past the fixture's
/// start.
const COLD_MARGIN: u64 = 600;

fn compaction_config(cold_after: u64) -> CompactionConfig {
    // Small packs and frames, so that a few hundred kilobytes make several of each.
    CompactionConfig { interval: 0, cold_after, pack_size: 256 << 10, frame_size: 64 << 10, zstd_level: 19 }
}

/// Every chunk of `chunks` reads back through `storage` (single reads and a batch), verified
/// against its name, with the size its manifest gives.
async fn assert_chunks_read(storage: &Storage, manifest: &Manifest) {
    for chunk_ref in &manifest.chunks {
        let frame = storage.get_chunk(&chunk_ref.hash).await.expect("reading a chunk");
        flywheel_core::chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize).expect("a chunk that verifies");
    }
    let batch = storage.get_chunks_versioned(manifest.chunks.iter().map(|c| c.hash).collect()).await;
    assert_eq!(batch.len(), manifest.chunks.len());
    for (chunk_ref, read) in manifest.chunks.iter().zip(batch) {
        let (frame, _) = read.expect("reading a chunk in a batch");
        flywheel_core::chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize).expect("a chunk that verifies");
    }
}

async fn packs(storage: &Storage) -> BTreeSet<String> {
    let listed = storage.list_objects("packs").await.expect("listing packs");
    listed.iter().map(|meta| meta.location.to_string()).collect()
}

/// Compaction packs the chunks of cold paths only; packed chunks read back verified, through
/// this server and a replica; a second run finds nothing to do; garbage collection keeps packs
/// that chunks point into, and deletes them with the last path that needs them.
pub async fn compaction_packs_cold_chunks(fixture: &Fixture) {
    let storage = &fixture.storage;
    let (grace, cold_after) = (60, 3600);
    create_cache(storage, CACHE, None).await;
    let (cold, cold_chunks) = publish(storage, grace, 80, "cold-1", 700 << 10).await;
    let (hot, hot_chunks) = publish(storage, grace, 81, "hot-1", 200 << 10).await;
    let cold_manifest = storage.manifest_of(&cold).await.unwrap();
    let hot_manifest = storage.manifest_of(&hot).await.unwrap();

    // Nothing is cold yet.
    let report = flywheel_server::compact::compact(storage, &compaction_config(cold_after), false).await.unwrap();
    assert_eq!((report.chunks_packed, report.packs_written, report.hot_nars), (0, 0, 2), "{report:?}");

    fixture.clock.advance(Duration::from_secs(cold_after + COLD_MARGIN));
    storage.put_access(CACHE, hash_part(&hot)).await.unwrap();
    let dry = flywheel_server::compact::compact(storage, &compaction_config(cold_after), true).await.unwrap();
    assert_eq!((dry.chunks_packed, dry.packs_written), (cold_chunks.len(), 0));
    assert!(packs(storage).await.is_empty(), "a dry run wrote a pack");

    let report = flywheel_server::compact::compact(storage, &compaction_config(cold_after), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.cold_nars, report.hot_nars, report.chunks_packed), (1, 1, cold_chunks.len()));
    assert!(report.packs_written >= 3, "700 KiB in packs of 256 KiB: {report:?}");
    assert_eq!(packs(storage).await.len(), report.packs_written);
    for hash in &cold_chunks {
        assert!(storage.chunk_pointer(hash).await.unwrap().is_some(), "cold chunk {hash} is not packed");
    }
    for hash in &hot_chunks {
        assert!(storage.chunk_pointer(hash).await.unwrap().is_none(), "hot chunk {hash} was packed");
    }
    // Chunk objects are still listed and looked up by name: dedup and grants see no change.
    assert_eq!(stored_chunks(storage).await, cold_chunks.union(&hot_chunks).copied().collect());
    assert_chunks_read(storage, &cold_manifest).await;
    assert_chunks_read(&fixture.replica(), &cold_manifest).await;
    assert_chunks_read(storage, &hot_manifest).await;

    let again = flywheel_server::compact::compact(storage, &compaction_config(cold_after), false).await.unwrap();
    assert_eq!((again.chunks_packed, again.packs_written), (0, 0), "{again:?}");

    // Live packs stay; once the path goes, its chunks go, then their packs.
    fixture.clock.advance(Duration::from_secs(2 * grace));
    let kept = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(kept.problems.is_empty(), "{:?}", kept.problems);
    assert_eq!((kept.packs_deleted, kept.packs_kept), (0, report.packs_written));
    assert_chunks_read(storage, &cold_manifest).await;
    storage.delete_path(CACHE, hash_part(&cold)).await.unwrap();
    let swept = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(swept.problems.is_empty(), "{:?}", swept.problems);
    assert_eq!(swept.packs_deleted, report.packs_written);
    assert!(packs(storage).await.is_empty());
    assert_chunks_read(storage, &hot_manifest).await;
}

/// What a crash in the middle of a compaction leaves (a pack that nothing points into yet, or
/// only some chunks pointing into it) reads whole, the next run finishes the job, and garbage
/// collection removes the pack nothing points into.
pub async fn compaction_interrupted_loses_nothing(fixture: &Fixture) {
    let storage = &fixture.storage;
    let (grace, cold_after) = (60, 3600);
    create_cache(storage, CACHE, None).await;
    let (path, _) = publish(storage, grace, 90, "cold-1", 400 << 10).await;
    let manifest = storage.manifest_of(&path).await.unwrap();

    // A crash after the pack was written: a pack of the first chunks, pointing only the first.
    let mut builder = flywheel_core::chunk::pack::PackBuilder::new(64 << 10, 3);
    for chunk_ref in &manifest.chunks[..3] {
        let frame = storage.get_chunk(&chunk_ref.hash).await.unwrap();
        let data = flywheel_core::chunk::decompress_verified(&frame, &chunk_ref.hash, chunk_ref.size as usize).unwrap();
        builder.add(chunk_ref.hash, &data).unwrap();
    }
    let (bytes, id, index) = builder.finish().unwrap();
    storage.put_pack(&id, Bytes::from(bytes)).await.unwrap();
    storage.put_chunk_pointer(&index.chunks[0].hash, &index.pointer(id, &index.chunks[0])).await.unwrap();
    assert_chunks_read(storage, &manifest).await;
    assert_chunks_read(&fixture.replica(), &manifest).await;

    // An orphan pack: written, then the crash, nothing points into it.
    let orphan_data = b"a chunk of a pack nothing points into".repeat(50);
    let mut orphan = flywheel_core::chunk::pack::PackBuilder::new(64 << 10, 3);
    orphan.add(ChunkHash::of(&orphan_data), &orphan_data).unwrap();
    let (orphan_bytes, orphan_id, _) = orphan.finish().unwrap();
    storage.put_pack(&orphan_id, Bytes::from(orphan_bytes)).await.unwrap();

    fixture.clock.advance(Duration::from_secs(cold_after + COLD_MARGIN));
    let report = flywheel_server::compact::compact(storage, &compaction_config(cold_after), false).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.chunks_packed, manifest.chunks.len() - 1, "all but the chunk already pointed: {report:?}");
    // The first pack, one of its three chunks pointing into it, is mostly dead when that
    // chunk is the smaller part of its bytes: then its chunk moves to this run's pack too.
    let first_live = u64::from(index.chunks[0].len) * 2 >= index.chunks.iter().map(|e| u64::from(e.len)).sum::<u64>();
    assert_eq!((report.packs_rewritten, report.chunks_repacked), if first_live { (0, 0) } else { (1, 1) }, "{report:?}");
    assert_chunks_read(storage, &manifest).await;

    let swept = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(swept.problems.is_empty(), "{:?}", swept.problems);
    // The orphan goes, and the first pack unless it was written anew.
    assert_eq!(swept.packs_deleted, if first_live { 1 } else { 2 });
    assert!(storage.get_pack(&orphan_id).await.unwrap().is_none());
    assert_eq!(storage.get_pack(&id).await.unwrap().is_some(), first_live);
    assert_chunks_read(storage, &manifest).await;
}

/// A damaged pack never serves a byte: its chunks fail to read, fsck names the pack, takes the
/// path out of service and deletes the pointers, and a re-push stores the chunks again.
pub async fn compaction_damaged_pack_is_found_and_repaired(fixture: &Fixture) {
    let storage = &fixture.storage;
    let (grace, cold_after) = (60, 3600);
    create_cache(storage, CACHE, None).await;
    let contents = nar(95, 300 << 10);
    let (manifest, _) = upload(storage, grace, &contents).await;
    let path = record(storage, 95, "damaged-1", &manifest);
    storage.put_path(CACHE, &path).await.unwrap();
    fixture.clock.advance(Duration::from_secs(cold_after + COLD_MARGIN));
    let report = flywheel_server::compact::compact(storage, &compaction_config(cold_after), false).await.unwrap();
    assert_eq!(report.chunks_packed, manifest.chunks.len());

    // Flip a byte in the middle of the first pack's first frame.
    let first = manifest.chunks[0].hash;
    let pointer = storage.chunk_pointer(&first).await.unwrap().unwrap();
    let key = storage.list_objects("packs").await.unwrap().into_iter().find(|m| Storage::pack_of_key(&m.location) == Some(pointer.pack)).unwrap().location;
    let mut bytes = storage.get_pack(&pointer.pack).await.unwrap().unwrap().to_vec();
    let at = (pointer.frame_offset + u64::from(pointer.frame_len) / 2) as usize;
    bytes[at] ^= 0x40;
    object_store::ObjectStoreExt::put(storage.object_store().as_ref(), &key, bytes.into()).await.unwrap();
    // A fresh server (no frame read yet) reads the damage.
    let reader = fixture.replica();
    assert_eq!(reader.get_chunk(&first).await.unwrap_err().kind(), ErrorKind::Corrupt);

    let found = flywheel_server::fsck::fsck(&reader, 4, true).await.unwrap();
    assert!(found.damaged_packs.contains(&pointer.pack), "{found:?}");
    assert!(found.corrupt.contains(&first));
    assert_eq!(found.damaged_paths, [(CACHE.to_string(), path.store_path.clone())]);
    assert!(!storage.has_path(CACHE, hash_part(&path)).await.unwrap());
    assert_eq!(storage.chunk_size(&first).await.unwrap(), None, "the damaged chunk's pointer is gone");

    // A re-push stores the damaged chunks again, and the path reads whole.
    let (again, _) = upload(storage, grace, &contents).await;
    storage.put_path(CACHE, &record(storage, 95, "damaged-1", &again)).await.unwrap();
    assert_chunks_read(&fixture.replica(), &again).await;
}

/// A pack whose chunks mostly went (their path deleted and collected) is written anew by the
/// next compaction with the chunks that remain, and garbage collection then deletes the old
/// one: the space comes back, and the remaining path reads whole throughout.
pub async fn compaction_rewrites_mostly_dead_packs(fixture: &Fixture) {
    let storage = &fixture.storage;
    let (grace, cold_after) = (60, 3600);
    create_cache(storage, CACHE, None).await;
    let (gone, _) = publish(storage, grace, 97, "gone-1", 600 << 10).await;
    let (kept, _) = publish(storage, grace, 98, "kept-1", 150 << 10).await;
    let kept_manifest = storage.manifest_of(&kept).await.unwrap();
    // One pack for both paths.
    let config = CompactionConfig { pack_size: 4 << 20, ..compaction_config(cold_after) };
    fixture.clock.advance(Duration::from_secs(cold_after + COLD_MARGIN));
    let first = flywheel_server::compact::compact(storage, &config, false).await.unwrap();
    assert_eq!((first.packs_written, first.packs_rewritten), (1, 0), "{first:?}");
    let old_packs = packs(storage).await;

    storage.delete_path(CACHE, hash_part(&gone)).await.unwrap();
    fixture.clock.advance(Duration::from_secs(2 * grace));
    let collected = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert!(collected.problems.is_empty(), "{:?}", collected.problems);
    assert_eq!(collected.packs_kept, 1, "the pack still holds a live path's chunks");
    assert_chunks_read(storage, &kept_manifest).await;

    let dry = flywheel_server::compact::compact(storage, &config, true).await.unwrap();
    assert_eq!((dry.packs_rewritten, dry.chunks_repacked), (1, kept_manifest.chunks.len()));
    assert_eq!(packs(storage).await, old_packs, "a dry run wrote a pack");
    let rewritten = flywheel_server::compact::compact(storage, &config, false).await.unwrap();
    assert!(rewritten.problems.is_empty(), "{:?}", rewritten.problems);
    assert_eq!((rewritten.packs_rewritten, rewritten.chunks_repacked, rewritten.packs_written), (1, kept_manifest.chunks.len(), 1));
    assert_chunks_read(storage, &kept_manifest).await;
    assert_chunks_read(&fixture.replica(), &kept_manifest).await;

    fixture.clock.advance(Duration::from_secs(2 * grace));
    let swept = flywheel_server::gc::collect(storage, &gc_config(grace), false).await.unwrap();
    assert_eq!(swept.packs_deleted, 1);
    let now_packs = packs(storage).await;
    assert_eq!(now_packs.len(), 1);
    assert!(now_packs.is_disjoint(&old_packs), "the old pack is gone");
    assert_chunks_read(storage, &kept_manifest).await;
    let again = flywheel_server::compact::compact(storage, &config, false).await.unwrap();
    assert_eq!((again.packs_rewritten, again.packs_written), (0, 0), "{again:?}");
}
