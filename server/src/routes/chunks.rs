//! flywheel's chunk API under `/_flywheel/v1/{cache}/`: what runners use to move only the
//! chunks they lack. Wire types and framing are in `flywheel_core::api::v1::chunks`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flywheel_core::api::v1::chunks::{
    BaseChunks, ChunkBatch, ChunkList, CommitRequest, DeltaRun, PathManifest, MAX_CHUNKS_PER_REQUEST, MAX_CHUNK_REPEATS,
};
use flywheel_core::api::v1::chunk_bodies::{framed_chunk, parse_upload_records};
use flywheel_core::chunk::{max_frame_len, ChunkHash};
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::{Sha256Hash, StorePath};
use flywheel_core::Error;
use futures::{StreamExt, TryStreamExt};
use tracing::instrument;

use super::{ApiBytes, ApiPath, ApiQuery};
use super::binary_cache::{path_record, render_narinfo};
use super::publish::PathMetadata;
use super::{Access, ApiJson, Pull, Push};
use crate::error::ApiError;
use crate::chunk_reader::first_item_in;
use crate::state::AppState;
use crate::storage::Reuse;

type ApiResult<T> = Result<T, ApiError>;

fn parse_chunk(hash: &str) -> Result<ChunkHash, Error> {
    hash.parse()
}

fn check_count(n: usize) -> Result<(), Error> {
    if n > MAX_CHUNKS_PER_REQUEST {
        return Err(Error::invalid(format!("at most {MAX_CHUNKS_PER_REQUEST} chunks per request")));
    }
    Ok(())
}

/// `GET manifest/{hash}`: a path's narinfo fields, chunks and file index.
#[instrument(skip_all, fields(cache = %access.name, hash = %hash))]
pub async fn manifest(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let (cache, record) = (&access.name, &access.record);
    let path = path_record(&state, cache, &hash).await?;
    let manifest = state.manifest_of(&path).await?;
    state.record_access(cache, &hash).await;
    // The signatures are those of the narinfo, including the cache's own.
    let narinfo = flywheel_core::nix::NarInfo::parse(&render_narinfo(&path, record)?, &record.store_dir)?;
    let store_dir = &record.store_dir;
    let absolute = |base: &str| StorePath::from_base_name(base).map(|p| p.to_absolute(store_dir));
    Ok(state.manifest_response(PathManifest {
        store_path: absolute(&path.store_path)?,
        references: path.references.iter().map(|r| absolute(r)).collect::<Result<_, _>>()?,
        deriver: path.deriver.as_deref().map(absolute).transpose()?,
        sigs: narinfo.sigs,
        ca: path.ca.clone(),
        manifest,
    }, accepts_encoding(&headers, flywheel_core::api::v1::chunks::MANIFEST_ENCODING)).await?)
}

/// Whether the request's `Accept-Encoding` takes `encoding` (named, and not with `q=0`).
fn accepts_encoding(headers: &axum::http::HeaderMap, encoding: &str) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let named = parts.next().is_some_and(|name| name.eq_ignore_ascii_case(encoding));
            // Parameter names are case-insensitive (RFC 9110, 5.6.6): `Q=0` refuses too.
            let refused = parts.any(|param| {
                param.split_once('=').is_some_and(|(name, q)| {
                    name.trim().eq_ignore_ascii_case("q") && q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                })
            });
            named && !refused
        })
}

/// `GET base/{name}`: the chunk list of the path last published under the unversioned name of
/// `name` (a store path name), for a push of its next version to tell its chunks as changes to.
/// It needs pull: a chunk list tells what a path holds as surely as its bytes would.
#[instrument(skip_all, fields(cache = %access.name, name = %name))]
pub async fn base(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<BaseChunks>> {
    let cache = &access.name;
    let unversioned = StorePath::new([0; 20], name.as_str())?.unversioned_name();
    let no_base = || Error::not_found(format!("no path named like {name:?} is published in {cache}"));
    let hash = state.storage.newest_of_name(cache, &unversioned).await?.ok_or_else(no_base)?;
    // The newest may have been deleted since (garbage collection, retention).
    let path = state.storage.get_path(cache, &hash).await?.ok_or_else(no_base)?;
    let manifest = state.manifest_of(&path).await?;
    Ok(Json(BaseChunks {
        store_path: StorePath::from_base_name(&path.store_path)?.to_absolute(&access.record.store_dir),
        chunks: manifest.chunks.clone(),
    }))
}

/// The chunks of `wanted` as the manifest of the cache's path `hash_part` lists them, or an
/// error naming the first that it does not list (with that size). The same answer comes
/// whether or not the chunk is stored for another cache: a hash alone opens nothing.
async fn chunks_of_path(state: &AppState, cache: &str, hash_part: &str, wanted: &[ChunkRef]) -> Result<Vec<ChunkRef>, Error> {
    let path = path_record(state, cache, hash_part).await?;
    let manifest = state.manifest_of(&path).await?;
    let mut listed: std::collections::HashSet<ChunkRef> = wanted.iter().copied().collect();
    let asked = listed.len();
    let mut found = std::collections::HashSet::with_capacity(asked);
    for chunk in &manifest.chunks {
        if listed.remove(chunk) {
            found.insert(*chunk);
            if found.len() == asked {
                break;
            }
        }
    }
    if let Some(stranger) = wanted.iter().find(|c| !found.contains(c)) {
        return Err(Error::not_found(format!(
            "path {hash_part} of cache {cache:?} has no chunk {} of {} bytes",
            stranger.hash, stranger.size
        )));
    }
    Ok(wanted.to_vec())
}

/// The `path` query parameter of a chunk read.
#[derive(serde::Deserialize)]
pub struct ChunkOf {
    path: Option<String>,
}

fn path_named(path: Option<String>) -> Result<String, Error> {
    path.ok_or_else(|| Error::invalid("name the store path the chunk is read for (path, its hash part)"))
}

/// `GET chunk/{hash}?path={hash part}`: one verified chunk of that path, as its zstd frame.
pub async fn get_one(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
    ApiQuery(of): ApiQuery<ChunkOf>,
) -> ApiResult<Response> {
    let hash = parse_chunk(&hash)?;
    let path = path_named(of.path)?;
    let manifest_size = {
        let path_record = path_record(&state, &access.name, &path).await?;
        let manifest = state.manifest_of(&path_record).await?;
        manifest.chunks.iter().find(|c| c.hash == hash).map(|c| c.size)
    };
    let size = manifest_size
        .ok_or_else(|| Error::not_found(format!("path {path} of cache {:?} has no chunk {hash}", access.name)))?;
    let mut frames = Box::pin(chunk_frames(&state, vec![ChunkRef { hash, size }]).await?);
    let frame = frames.next().await.ok_or_else(|| Error::internal("a one-chunk read yielded nothing"))??;
    state.metrics.bytes_out.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(([(header::CONTENT_TYPE, "application/zstd")], frame).into_response())
}

/// The verified frames of `chunks`, in order: from memory when the chunk API sent them lately
/// (see [`crate::hot_chunks`]), else from storage, and then kept. The first is fetched and
/// verified before the stream is handed out, so a batch whose chunks are missing from storage
/// is a 5xx before the status line. Later chunks are verified as they stream: the runner's
/// client checks every frame and takes a stream cut short as a failed fetch, so a preflight of
/// the whole batch (which read every chunk twice, and doubled cold substitution time) buys it
/// nothing.
async fn chunk_frames(
    state: &AppState,
    chunks: Vec<ChunkRef>,
) -> Result<impl futures::Stream<Item = Result<Bytes, Error>> + Send + 'static, Error> {
    let hot = state.hot_chunks.clone();
    let kept: Vec<Option<Bytes>> = chunks.iter().map(|c| hot.get(&c.hash)).collect();
    let cold: Vec<ChunkRef> = chunks.iter().zip(&kept).filter(|(_, k)| k.is_none()).map(|(c, _)| *c).collect();
    let stored = Box::pin(state.chunk_reader().frames(cold));
    let metrics = state.metrics.clone();
    let slots = chunks.into_iter().zip(kept);
    // Each kept frame where it belongs, the stored ones between them in order; nothing after
    // an error.
    let merged = futures::stream::unfold((slots, stored, false), move |(mut slots, mut stored, failed)| {
        let (hot, metrics) = (hot.clone(), metrics.clone());
        async move {
            if failed {
                return None;
            }
            let (chunk, kept) = slots.next()?;
            let item = match kept {
                Some(frame) => {
                    metrics.hot_chunks_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(frame)
                }
                None => {
                    let item = stored.next().await?;
                    if let Ok(frame) = &item {
                        hot.put(chunk.hash, frame);
                    }
                    item
                }
            };
            let failed = item.is_err();
            Some((item, (slots, stored, failed)))
        }
    });
    first_item_in(merged).await
}

/// `POST chunks`: many verified chunks of one path, framed as [`framed_chunk`] says, in
/// request order.
pub async fn get_many(
    State(state): State<AppState>,
    access: Access<Pull>,
    ApiJson(request): ApiJson<ChunkBatch>,
) -> ApiResult<Response> {
    check_count(request.chunks.len())?;
    let chunks = chunks_of_path(&state, &access.name, &request.path, &request.chunks).await?;
    let metrics = state.metrics.clone();
    let stream = chunk_frames(&state, chunks)
        .await?
        .map_ok(move |frame| {
            metrics.bytes_out.fetch_add(8 + frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Bytes::from(framed_chunk(&frame))
        })
        .map_err(std::io::Error::other);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

/// `POST missing-chunks`: which of these chunks the cache cannot count on: those it does not
/// hold (whatever other caches store), and those stored too long ago.
pub async fn missing(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiJson(request): ApiJson<ChunkList>,
) -> ApiResult<Json<ChunkList>> {
    check_count(request.chunks.len())?;
    let cache = &access.name;
    let parallelism = state.config.chunk_parallelism;
    let held = state.storage.chunks_held(cache, &request.chunks, parallelism).await?;
    // Stale chunks count as missing: the uploader sends them again, which makes them young.
    let reusable_after = state.reuse_window().reusable_after();
    let candidates: Vec<ChunkHash> = request.chunks.iter().zip(&held).filter(|(_, held)| **held).map(|(h, _)| *h).collect();
    let fresh: std::collections::HashSet<ChunkHash> = candidates
        .iter()
        .zip(state.storage.chunks_reusable(candidates.clone(), reusable_after, parallelism).await?)
        .filter(|(_, fresh)| *fresh)
        .map(|(h, _)| *h)
        .collect();
    let chunks = request.chunks.iter().filter(|h| !fresh.contains(h)).copied().collect();
    let query = state.remember_chunk_query(cache, request.chunks);
    Ok(Json(ChunkList { chunks, query }))
}

/// `PUT chunk/{hash}`: stores one chunk given as a zstd frame, after checking it decompresses to
/// bytes with that name, and grants it to the cache.
pub async fn put_one(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, hash)): ApiPath<(String, String)>,
    ApiBytes(frame): ApiBytes,
) -> ApiResult<StatusCode> {
    let hash = parse_chunk(&hash)?;
    let max = state.config.chunking.max_size as usize;
    let checked = frame.clone();
    tokio::task::spawn_blocking(move || check_uploaded(&checked, &hash, max))
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
    store_uploaded(&state, &access.name, vec![(hash, frame)]).await?;
    Ok(StatusCode::OK)
}

/// Stores checked uploaded frames unless fresh copies are stored (a stale copy is written
/// again, so that garbage collection counts it as young), then grants them to the cache.
async fn store_uploaded(state: &AppState, cache: &str, frames: Vec<(ChunkHash, Bytes)>) -> Result<(), Error> {
    state.metrics.chunks_received.fetch_add(frames.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let reusable_after = state.reuse_window().reusable_after();
    let hashes: Vec<ChunkHash> = frames.iter().map(|(hash, _)| *hash).collect();
    futures::stream::iter(frames)
        .map(|(hash, frame)| {
            let storage = state.storage.clone();
            let verified = state.verified.clone();
            async move {
                if storage.chunk_reusable(&hash, reusable_after).await? != Reuse::Fresh {
                    let version = storage.put_chunk(&hash, frame.clone()).await?;
                    verified.remember(hash, version, &frame);
                }
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(state.config.chunk_parallelism)
        .try_collect::<()>()
        .await?;
    state.storage.put_grants(cache, &hashes, state.config.chunk_parallelism).await?;
    Ok(())
}

/// `POST upload-chunks`: stores several chunks in one request (fewer requests, and headers,
/// for a push of a few new chunks), as [`parse_upload_records`] reads them. Every frame is
/// checked like `PUT chunk/{hash}` before anything is stored; one bad record refuses the
/// request.
#[instrument(skip_all, fields(cache = %access.name, bytes = body.len()))]
pub async fn upload_many(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<StatusCode> {
    let records = parse_upload_records(&body)?;
    check_count(records.len())?;
    let max = state.config.chunking.max_size as usize;
    let checked: Vec<(ChunkHash, std::ops::Range<usize>)> = records.clone();
    let body_for_check = body.clone();
    tokio::task::spawn_blocking(move || {
        checked.iter().try_for_each(|(hash, range)| check_uploaded(&body_for_check[range.clone()], hash, max))
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))??;
    let frames = records.into_iter().map(|(hash, range)| (hash, body.slice(range))).collect();
    store_uploaded(&state, &access.name, frames).await?;
    Ok(StatusCode::OK)
}

/// The chunk list of a commit that names a `missing-chunks` question: `order` indexes the
/// question's list (the list itself when absent), `sizes` gives each chunk's size.
fn chunks_from_query(asked: &[ChunkHash], order: Option<Vec<u32>>, sizes: Vec<u32>) -> Result<Vec<ChunkRef>, Error> {
    let order: Vec<usize> = match order {
        Some(order) => order.into_iter().map(|i| i as usize).collect(),
        None => (0..asked.len()).collect(),
    };
    if order.len() != sizes.len() {
        return Err(Error::invalid(format!("{} chunks in chunkOrder but {} chunkSizes", order.len(), sizes.len())));
    }
    order
        .into_iter()
        .zip(sizes)
        .map(|(i, size)| {
            let hash = asked.get(i).ok_or_else(|| Error::invalid(format!("chunkOrder index {i} is past the {} chunks asked about", asked.len())))?;
            Ok(ChunkRef { hash: *hash, size })
        })
        .collect()
}

/// Checks an uploaded zstd frame: exactly one standard zstd frame (no skippable frames, which
/// would let a small chunk be stored and served as a large object, and nothing after it),
/// of at most `max` bytes named `hash`.
fn check_uploaded(frame: &[u8], hash: &ChunkHash, max: usize) -> Result<(), Error> {
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let not_a_frame = |why: &str| {
        Error::invalid(format!("chunk {hash} is not a zstd frame of at most {max} bytes, alone in its record: {why}"))
    };
    if !frame.starts_with(&ZSTD_MAGIC) {
        return Err(not_a_frame("it does not start with a zstd frame header"));
    }
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(len) if len == frame.len() => {}
        Ok(_) => return Err(not_a_frame("bytes follow the frame")),
        Err(_) => return Err(not_a_frame("the frame is cut or malformed")),
    }
    let longest = |len: usize| max_frame_len(len as u64);
    if frame.len() as u64 > longest(max) {
        return Err(not_a_frame("it is longer than any encoder makes"));
    }
    let data = zstd::bulk::decompress(frame, max).map_err(|e| not_a_frame(&e.to_string()))?;
    if frame.len() as u64 > longest(data.len()) {
        return Err(not_a_frame("it is padded beyond what an encoder makes for its content"));
    }
    if ChunkHash::of(&data) != *hash {
        return Err(Error::invalid(format!("chunk content does not hash to {hash}")));
    }
    Ok(())
}

/// `POST commit`: publishes a path from stored chunks, after rebuilding its NAR from them and
/// checking hash, size and structure. Every chunk must be held by the cache: copied from the
/// published base of a delta, or granted to it by an upload (see [`Storage::grant_chunks`]).
///
/// [`Storage::grant_chunks`]: crate::storage::Storage::grant_chunks
#[instrument(skip_all, fields(cache = %access.name))]
pub async fn commit(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiJson(request): ApiJson<CommitRequest>,
) -> ApiResult<StatusCode> {
    let (cache, record) = (&access.name, &access.record);
    let mut request = request;
    // Chunks a delta copies from its base are held by the cache: the base is one of its paths.
    let mut from_base: std::collections::HashSet<ChunkRef> = std::collections::HashSet::new();
    if let Some(delta) = request.chunks_delta.take() {
        if !request.chunks.is_empty() || request.chunks_query.is_some() {
            return Err(Error::invalid("give one of chunks, chunksQuery and chunksDelta").into());
        }
        flywheel_core::nix::store_path::parse_hash_part(&delta.base)?;
        let base = state.storage.get_path(cache, &delta.base).await?.ok_or_else(|| {
            Error::not_found(format!("base path {} of chunksDelta is not published in {cache}: send the chunks", delta.base))
        })?;
        let base_chunks = state.manifest_of(&base).await?.chunks.clone();
        request.chunks = delta.expand(&base_chunks, MAX_CHUNKS_PER_REQUEST)?;
        let new: std::collections::HashSet<ChunkRef> =
            delta.runs.iter().filter_map(|run| if let DeltaRun::New(c) = run { Some(*c) } else { None }).collect();
        from_base = base_chunks.into_iter().filter(|c| !new.contains(c)).collect();
    }
    if let Some(name) = request.chunks_query.take() {
        if !request.chunks.is_empty() {
            return Err(Error::invalid("give chunks or chunksQuery, not both").into());
        }
        let query = state.chunk_query(cache, &name).ok_or_else(|| {
            Error::not_found(format!("unknown chunk query {name:?} (expired, or asked of another server): send the chunks"))
        })?;
        request.chunks = chunks_from_query(&query.chunks, request.chunk_order.take(), std::mem::take(&mut request.chunk_sizes))?;
    }
    check_count(request.chunks.len())?;
    let nar_hash = Sha256Hash::parse(&request.nar_hash)?;
    let (_, path) = PathMetadata {
        store_path: &request.store_path,
        cache: record,
        nar_hash,
        nar_size: request.nar_size,
        references: &request.references,
        deriver: request.deriver.as_deref(),
        system: None,
        sigs: &request.sigs,
        ca: request.ca.as_deref(),
    }
    .into_record(state.storage.clock().now_secs())?;
    let max = state.config.chunking.max_size;
    if request.chunks.iter().any(|c| c.size == 0 || c.size > max) {
        return Err(Error::invalid(format!("chunk sizes must be between 1 and {max}")).into());
    }
    let total: u64 = request.chunks.iter().map(|c| u64::from(c.size)).sum();
    if total != request.nar_size {
        return Err(Error::invalid(format!("chunks add up to {total} bytes, not narSize {}", request.nar_size)).into());
    }
    let mut repeats: std::collections::HashMap<ChunkHash, usize> = std::collections::HashMap::new();
    for chunk in &request.chunks {
        let seen = repeats.entry(chunk.hash).or_default();
        *seen += 1;
        if *seen > MAX_CHUNK_REPEATS {
            return Err(Error::invalid(format!(
                "chunk {} stands more than {MAX_CHUNK_REPEATS} times in the list: upload such a NAR whole (upload-path)",
                chunk.hash
            ))
            .into());
        }
    }
    let mut unique: Vec<ChunkHash> = repeats.into_keys().collect();
    unique.sort_unstable();
    let to_check: Vec<ChunkHash> = {
        let base_hashes: std::collections::HashSet<ChunkHash> = from_base.iter().map(|c| c.hash).collect();
        unique.iter().filter(|h| !base_hashes.contains(h)).copied().collect()
    };
    let held = state.storage.chunks_held(cache, &to_check, state.config.chunk_parallelism).await?;
    let not_held: Vec<&ChunkHash> = to_check.iter().zip(held).filter(|(_, held)| !held).map(|(h, _)| h).collect();
    if let Some(first) = not_held.first() {
        return Err(not_uploaded(not_held.len(), first, cache).into());
    }
    let window = state.reuse_window();
    let started = state.storage.clock().now_ms();
    let reusable_after = window.reusable_after();
    let reuse: Vec<(ChunkHash, Reuse)> = futures::stream::iter(unique)
        .map(|hash| {
            let storage = state.storage.clone();
            async move { storage.chunk_reusable(&hash, reusable_after).await.map(|r| (hash, r)) }
        })
        .buffered(state.config.chunk_parallelism)
        .try_collect()
        .await?;
    let missing: Vec<&ChunkHash> = reuse.iter().filter(|(_, r)| *r == Reuse::Missing).map(|(h, _)| h).collect();
    if let Some(first) = missing.first() {
        return Err(not_uploaded(missing.len(), first, cache).into());
    }
    let manifest = match state.ingester.verify_chunks(request.chunks.clone()).await {
        Ok(manifest) => manifest,
        Err(err) if err.kind() == flywheel_core::ErrorKind::Corrupt => {
            return Err(blame_for_failed_check(&state, &request.chunks, err).await.into())
        }
        Err(err) => return Err(Error::invalid(format!("the chunks do not make a valid NAR: {err}")).into()),
    };
    if (manifest.nar_hash, manifest.nar_size) != (nar_hash, request.nar_size) {
        return Err(Error::invalid(format!(
            "the chunks make a NAR with hash {} and size {}, not {} and {}",
            manifest.nar_hash, manifest.nar_size, nar_hash, request.nar_size
        ))
        .into());
    }
    // Chunks stored but too old to count on (a collection may be about to sweep them) are
    // written again, which makes them young; they were just read and verified.
    let stale: Vec<ChunkHash> = reuse.iter().filter(|(_, r)| *r == Reuse::Stale).map(|(h, _)| *h).collect();
    for hash in &stale {
        let (frame, version) = state.storage.rewrite_chunk(hash).await?;
        let known = state.verified.is_known_frame(hash, &frame);
        if known {
            state.verified.remember(*hash, version, &frame);
        }
    }
    state.storage.put_upload_manifest(&manifest, started, window, &stale, "commit").await?;
    state.publish_path(cache, &path).await?;
    tracing::info!(store_path = %path.store_path, "published through chunk commit");
    Ok(StatusCode::OK)
}

/// The refusal of a commit that counts on chunks the cache does not hold. It reads the same
/// whether another cache stores them or nobody does.
fn not_uploaded(count: usize, first: &ChunkHash, cache: &str) -> Error {
    Error::invalid(format!("{count} chunks are not uploaded to cache {cache:?}; upload them first (first: {first})"))
}

/// Who is to blame when a commit's chunks fail their check: the caller, when every chunk it
/// names matches its name and only a size it gave is wrong; storage otherwise.
async fn blame_for_failed_check(state: &AppState, chunks: &[ChunkRef], err: Error) -> Error {
    let mut distinct: Vec<ChunkRef> = chunks.to_vec();
    distinct.sort_unstable_by_key(|c| c.hash);
    distinct.dedup();
    let max = state.config.chunking.max_size as usize;
    for chunk in distinct {
        let Ok(frame) = state.storage.get_chunk(&chunk.hash).await else { return err };
        let Ok(data) = zstd::bulk::decompress(&frame, max) else { return err };
        if ChunkHash::of(&data) != chunk.hash {
            return err;
        }
        if data.len() != chunk.size as usize {
            return Error::invalid(format!("chunk {} has {} bytes, not {} as the commit says", chunk.hash, data.len(), chunk.size));
        }
    }
    err
}

#[cfg(test)]
mod tests {
    //! Property tests of the commit's chunk list and of uploaded frames (fuzzing stand-ins; the
    //! `upload-chunks` parser's are in the core crate's `tests/properties`).

    use super::*;
    use flywheel_core::ErrorKind;
    use proptest::prelude::*;
    use crate::proptest_config as config;

    proptest! {
        #![proptest_config(config(500))]

        #[test]
        fn chunks_from_query_follows_the_order_or_refuses(
            asked in proptest::collection::vec(any::<[u8; 32]>().prop_map(ChunkHash), 0..8),
            order in proptest::option::of(proptest::collection::vec(prop_oneof![0u32..10, any::<u32>()], 0..10)),
            sizes in proptest::collection::vec(any::<u32>(), 0..10),
        ) {
            let indexes: Vec<usize> = order.clone().map_or_else(|| (0..asked.len()).collect(), |o| o.into_iter().map(|i| i as usize).collect());
            let fits = indexes.len() == sizes.len() && indexes.iter().all(|&i| i < asked.len());
            match chunks_from_query(&asked, order, sizes.clone()) {
                Ok(chunks) => {
                    prop_assert!(fits);
                    let want: Vec<ChunkRef> = indexes.iter().zip(&sizes).map(|(&i, &size)| ChunkRef { hash: asked[i], size }).collect();
                    prop_assert_eq!(chunks, want);
                }
                Err(err) => {
                    prop_assert!(!fits);
                    prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
                }
            }
        }

        /// An uploaded frame is accepted only when it is one real frame of the named bytes.
        #[test]
        fn uploaded_frames_are_checked(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
            max in prop_oneof![Just(4096usize), 0usize..2000],
        ) {
            let hash = ChunkHash::of(&data);
            let frame = flywheel_core::chunk::compress(&data, 3).unwrap();
            prop_assert!(check_uploaded(&frame, &hash, 4096).is_ok());
            let mut flipped = frame.clone();
            let i = at.index(flipped.len());
            flipped[i] ^= mask;
            let mut trailing = frame.clone();
            trailing.extend_from_slice(&garbage);
            let mut magic_garbage = vec![0x28, 0xb5, 0x2f, 0xfd];
            magic_garbage.extend_from_slice(&garbage);
            for candidate in [&frame, &flipped, &trailing, &garbage, &magic_garbage] {
                if let Err(err) = check_uploaded(candidate, &hash, max) {
                    prop_assert_eq!(err.kind(), ErrorKind::InvalidInput);
                } else {
                    prop_assert!(data.len() <= max);
                }
            }
            if !garbage.is_empty() {
                prop_assert!(check_uploaded(&trailing, &hash, 4096).is_err());
            }
        }
    }

    #[test]
    fn accept_encoding_is_read_as_http_says() {
        let accepts = |values: &[&str]| {
            let mut headers = axum::http::HeaderMap::new();
            for value in values {
                headers.append(axum::http::header::ACCEPT_ENCODING, value.parse().unwrap());
            }
            accepts_encoding(&headers, "zstd")
        };
        assert!(accepts(&["zstd"]));
        assert!(accepts(&["gzip, ZSTD;q=0.5"]));
        assert!(accepts(&["gzip", "br, zstd"]));
        assert!(!accepts(&[]));
        assert!(!accepts(&["gzip, br"]));
        assert!(!accepts(&["zstd;q=0"]));
        assert!(!accepts(&["zstd ; q=0.0"]));
        assert!(!accepts(&["zstd;Q=0"]));
        assert!(!accepts(&["zstd; q = 0"]));
        assert!(!accepts(&["zstdx"]));
    }
}
